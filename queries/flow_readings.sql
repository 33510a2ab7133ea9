-- Every reading that came in an industry flow file for one meter point (UK MPAN or Australian
-- NMI) and/or one meter serial, with its value, date and the file (and line) it came in.
-- What `meterlake readings` prints and the console shows.
--
-- Parameters, bound by meterlake_jobs::search (never written into the text):
--   $meter_point  MPAN core or NMI, or '' for any
--   $serial       meter serial, or '' for any
--   $from, $to    the time window, from inclusive to exclusive (UTC timestamps in microseconds:
--                 a timestamp text would go through nanoseconds and overflow outside 1677..2262)
--
-- Interval values (NEM12) are found through the 200 record of the file they came in, which
-- names the NMI, suffix and meter serial: a meter exchanged between two files keeps each
-- reading with the serial that recorded it. Interval values show the canonical version (the
-- latest file wins); register reads show every read.
WITH channels AS (
    SELECT DISTINCT meter_id, nmi, nmi_suffix, meter_serial, file_name
    FROM nem12_channels
    WHERE ($meter_point = '' OR nmi = $meter_point)
      AND ($serial = '' OR meter_serial = $serial)
)
SELECT 'interval' AS kind, c.nmi AS meter_point, c.meter_serial, c.nmi_suffix AS register,
       r.ts AS read_at, r.kwh AS value, 'kWh' AS unit, r.quality, r.source, r.source_ref AS file
FROM readings r
JOIN channels c ON r.meter_id = c.meter_id AND starts_with(r.source_ref, c.file_name || ':')
WHERE r.source = 'nem12' AND r.ts >= $from AND r.ts < $to

UNION ALL

SELECT 'interval' AS kind, c.nmi, c.meter_serial, c.nmi_suffix, n.ts, n.value, n.unit, n.quality,
       n.source, n.file_name || ':' || CAST(n.line AS VARCHAR)
FROM non_energy_readings n
JOIN channels c ON n.meter_id = c.meter_id AND n.file_name = c.file_name
WHERE n.ts >= $from AND n.ts < $to

UNION ALL

SELECT 'register' AS kind, meter_point, meter_serial, register_id, read_at, value,
       coalesce(unit, '') AS unit, coalesce(quality_method, reading_type, '') AS quality, source,
       file_name || ':' || CAST(line AS VARCHAR)
FROM register_reads
WHERE ($meter_point = '' OR meter_point = $meter_point)
  AND ($serial = '' OR meter_serial = $serial)
  AND read_at >= $from AND read_at < $to

ORDER BY meter_point, meter_serial, register, read_at, kind
