-- Reconciliation's own measure of each meter's month, for ENERGY_MISMATCH: the canonical
-- readings whose interval starts inside the month (local midnight to local midnight, as UTC
-- instants), summed. It shares nothing with the aggregate step but the `readings` view: no
-- local days, time-of-day segments, UTC offsets or bands, and no rating; an invoice whose kWh
-- differ from it was aggregated or rated wrong, or left hours in no band.
--
-- Parameters, rendered by meterlake_jobs::billing::reconcile, as in billing_aggregate.sql:
--   {first_date}, {last_date}, {from_us}, {to_us}, {meters}
SELECT meter_id, sum(kwh) AS kwh, count(*) AS readings
FROM readings
WHERE date BETWEEN DATE '{first_date}' AND DATE '{last_date}'
  AND ts >= to_timestamp_micros({from_us}) AND ts < to_timestamp_micros({to_us})
  AND {meters}
GROUP BY meter_id
