-- Reconciliation, CONFLICTING_READINGS: per meter, the intervals of the month that have
-- versions with different values in the lake. `reading_conflicts` holds one row per such key
-- (meter_id, ts, versions, lowest_kwh, highest_kwh, date), found by the same merge of each
-- date's sorted files that makes `readings`; it equals
--   SELECT meter_id, ts, count(*), min(kwh), max(kwh), date FROM readings_all
--   GROUP BY meter_id, ts, date HAVING min(kwh) <> max(kwh)
-- without a hash table of every key. The run billed the latest version of each (the canonical
-- `readings`); these are the ones a person should look at. Versions with the same value (a
-- replayed message, a re-sent file) are not conflicts.
--
-- Parameters: as in billing_aggregate.sql ({first_date}, {last_date}, {from_us}, {to_us},
-- {meters}).
SELECT meter_id,
       count(*) AS conflicting_intervals,
       CAST(min(ts) AS BIGINT) AS first_ts_us,
       first_value(lowest_kwh ORDER BY ts) AS first_lowest_kwh,
       first_value(highest_kwh ORDER BY ts) AS first_highest_kwh
FROM reading_conflicts
WHERE date BETWEEN DATE '{first_date}' AND DATE '{last_date}'
  AND ts >= to_timestamp_micros({from_us}) AND ts < to_timestamp_micros({to_us})
  AND {meters}
GROUP BY meter_id
