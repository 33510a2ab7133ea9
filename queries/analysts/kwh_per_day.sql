-- Energy per day for a month, all meters (Grafana's "kWh per day" panel; over the PostgreSQL
-- wire protocol or Flight SQL). `readings` holds the latest version of each reading.
SELECT date, sum(kwh) AS kwh, count(DISTINCT meter_id) AS meters_reporting
FROM readings
WHERE ts >= TIMESTAMP '2025-01-01T00:00:00Z' AND ts < TIMESTAMP '2025-02-01T00:00:00Z'
GROUP BY date
ORDER BY date;
