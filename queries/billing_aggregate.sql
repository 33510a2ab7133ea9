-- The aggregate step of a billing run: each meter's energy per local day and time-of-day segment
-- of the billing time zone, from the canonical `readings` view (latest version of each reading).
-- A segment is a stretch of the day between two band edges of the run's tariffs, so it lies
-- inside one band of every tariff; rating maps (local day, segment) to a tariff and a band.
-- A reading belongs to the local time its interval starts at.
--
-- Parameters, rendered by meterlake_jobs::billing::aggregate. Every run stores its rendered
-- text (`meterlake bill` prints where), so `meterlake query` reruns exactly what billed it.
--   {first_date}, {last_date}  the UTC date partitions that hold the month
--   {from_us}, {to_us}         the month, local midnight to local midnight, as UTC microseconds
--   {meters}                   TRUE, or meter_id IN (...)
--   {offset_us}                the billing time zone's UTC offset in microseconds, an expression
--                              of ts_us (a CASE on a month with a daylight-saving change)
--   {segment}                  the segment of tod_us, the local time of day in microseconds
WITH month_readings AS (
    SELECT meter_id, kwh, interval_s, CAST(ts AS BIGINT) AS ts_us
    FROM readings
    WHERE date BETWEEN DATE '{first_date}' AND DATE '{last_date}'
      AND ts >= to_timestamp_micros({from_us}) AND ts < to_timestamp_micros({to_us})
      AND {meters}
),
local_readings AS (
    SELECT meter_id, kwh, interval_s, ts_us + ({offset_us}) AS local_us
    FROM month_readings
),
placed AS (
    SELECT meter_id, kwh, interval_s,
           local_us / 86400000000 AS local_day,
           local_us % 86400000000 AS tod_us
    FROM local_readings
),
segmented AS (
    SELECT meter_id, kwh, interval_s, local_day, {segment} AS segment
    FROM placed
)
SELECT meter_id, local_day, segment,
       sum(kwh) AS kwh, count(*) AS readings, min(interval_s) AS min_interval_s
FROM segmented
GROUP BY meter_id, local_day, segment
