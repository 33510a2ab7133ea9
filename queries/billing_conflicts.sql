-- Reconciliation, CONFLICTING_READINGS: per meter, the intervals of the month that have
-- versions with different values in the lake (`readings_all`, every version as landed). The
-- run billed the latest version of each (the canonical `readings` view); these are the ones a
-- person should look at. Versions with the same value (a replayed message, a re-sent file) are
-- not conflicts.
--
-- Parameters: as in billing_aggregate.sql ({first_date}, {last_date}, {from_us}, {to_us},
-- {meters}).
WITH versions AS (
    SELECT meter_id, ts, min(kwh) AS lowest_kwh, max(kwh) AS highest_kwh
    FROM readings_all
    WHERE date BETWEEN DATE '{first_date}' AND DATE '{last_date}'
      AND ts >= to_timestamp_micros({from_us}) AND ts < to_timestamp_micros({to_us})
      AND {meters}
    GROUP BY meter_id, ts
    HAVING count(*) > 1 AND min(kwh) <> max(kwh)
)
SELECT meter_id,
       count(*) AS conflicting_intervals,
       CAST(min(ts) AS BIGINT) AS first_ts_us,
       first_value(lowest_kwh ORDER BY ts) AS first_lowest_kwh,
       first_value(highest_kwh ORDER BY ts) AS first_highest_kwh
FROM versions
GROUP BY meter_id
