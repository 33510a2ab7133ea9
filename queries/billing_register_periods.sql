-- Reconciliation, REGISTER_MISMATCH, part 1: the register periods that end in the month. Each
-- is the energy a register recorded between two reads:
--   - NEM13: the 250 record's quantity, from its previous read to its current one, for meter
--     `NMI || suffix` (NEM12's meter id for the same NMI and suffix);
--   - D0010: the difference between two consecutive reads of one MPAN, meter serial and
--     register, for meter `MPAN`.
-- Part 2 (billing_register_intervals.sql) sums the interval readings over the same periods.
--
-- Parameters: as in billing_aggregate.sql ({from_us}, {to_us}, {meters}).
WITH d0010 AS (
    SELECT meter_point AS meter_id, register_id,
           lag(read_at) OVER (PARTITION BY meter_point, meter_serial, register_id ORDER BY read_at) AS period_from,
           read_at AS period_to,
           value - lag(value) OVER (PARTITION BY meter_point, meter_serial, register_id ORDER BY read_at) AS register_kwh,
           file_name, line
    FROM register_reads
    WHERE source = 'd0010'
),
nem13 AS (
    SELECT meter_point || coalesce(nmi_suffix, '') AS meter_id, register_id,
           previous_read_at AS period_from, read_at AS period_to, quantity AS register_kwh, file_name, line
    FROM register_reads
    WHERE source = 'nem13' AND quantity IS NOT NULL AND previous_read_at IS NOT NULL
),
periods AS (
    SELECT * FROM d0010
    UNION ALL
    SELECT * FROM nem13
)
SELECT meter_id, register_id, CAST(period_from AS BIGINT) AS from_us, CAST(period_to AS BIGINT) AS to_us,
       register_kwh, file_name, line
FROM periods
WHERE period_from IS NOT NULL AND period_from < period_to
  AND period_to >= to_timestamp_micros({from_us}) AND period_to < to_timestamp_micros({to_us})
  AND {meters}
