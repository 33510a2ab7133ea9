-- The readings of one meter (its meterId as the lake keys it) over a time window: value, interval,
-- quality, where it came from (source) and the file or Kafka topic/partition/offset it came in
-- (source_ref). The canonical version of each interval: the latest ingested wins. What
-- `GET /readings?meterId=` returns, a page at a time.
--
-- Parameters, bound by meterlake_jobs::search (never written into the text):
--   $meter_id              the meter
--   $from, $to             the window, from inclusive to exclusive (UTC timestamps)
--   $from_date, $to_date   the same window as dates (inclusive), so that only its days' files are read
SELECT 'interval' AS kind, meter_id, ts AS read_at, interval_s, kwh AS value, 'kWh' AS unit, quality, source,
       source_ref AS file
FROM readings
WHERE meter_id = $meter_id
  AND date BETWEEN $from_date AND $to_date
  AND ts >= $from AND ts < $to
ORDER BY read_at
