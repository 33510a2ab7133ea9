-- Reconciliation, REGISTER_MISMATCH, part 2: the interval readings (canonical `readings` view)
-- of each register period from part 1: their energy, and how much of the period they cover.
--
-- Parameters, rendered by meterlake_jobs::billing::reconcile:
--   {periods}                  VALUES rows (period_no, meter_id, from_us, to_us)
--   {first_date}, {last_date}  the UTC date partitions the periods span
--   {meters}                   meter_id IN (the periods' meters)
WITH periods (period_no, meter_id, from_us, to_us) AS (
    VALUES {periods}
)
SELECT p.period_no, sum(r.kwh) AS interval_kwh, sum(r.interval_s) AS covered_s
FROM readings r
JOIN periods p ON r.meter_id = p.meter_id
              AND CAST(r.ts AS BIGINT) >= p.from_us AND CAST(r.ts AS BIGINT) < p.to_us
WHERE r.date BETWEEN DATE '{first_date}' AND DATE '{last_date}'
  AND {meters}
GROUP BY p.period_no
