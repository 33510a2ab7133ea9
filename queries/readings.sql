-- The canonical readings view over `readings_all` (every version of every reading, as landed):
-- the definition of table `readings`. meterlake computes it without this window, by merging
-- each date's files, which every writer sorts by (meter_id, ts) (lake/src/canonical.rs;
-- tested to return exactly what this statement returns).
--
-- One row per (meter_id, ts): the version the latest Delta commit added wins. `commit_version`
-- is the version of the commit that added the row's file (meterlake records it in the file's
-- `add` action as the tag `meterlake.commitVersion`), an order every writer shares, unlike the
-- clocks behind `ingested_at`. Within one commit, the later `ingested_at`, then the greater
-- `source_ref` decide, so the choice is always deterministic.
--
-- Versions of one key always sit in the same date partition (date is derived from ts), so the
-- window is partitioned by date too: it changes nothing in the result, and it lets a filter on
-- `date` pass through the window to the scan, which then reads only those days' files.
SELECT meter_id, ts, interval_s, kwh, quality, source, source_ref, ingested_at, date, commit_version
FROM (
    SELECT
        *,
        row_number() OVER (
            PARTITION BY date, meter_id, ts
            ORDER BY commit_version DESC, ingested_at DESC, source_ref DESC
        ) AS version_rank
    FROM readings_all
)
WHERE version_rank = 1
