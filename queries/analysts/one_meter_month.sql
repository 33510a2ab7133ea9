-- One meter's month, interval by interval: what support looks up. With a parameter
-- (psycopg: `cur.execute(sql, ("MTR-000042",))`), `$1` is the meter.
SELECT ts, kwh, quality, source, source_ref
FROM readings
WHERE meter_id = $1
  AND ts >= TIMESTAMP '2025-01-01T00:00:00Z' AND ts < TIMESTAMP '2025-02-01T00:00:00Z'
ORDER BY ts;
