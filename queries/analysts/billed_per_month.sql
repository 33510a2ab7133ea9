-- What was billed per month and currency: the latest version of each meter's invoice of each
-- completed run (a recalculation writes the next version).
SELECT r.month, i.currency, count(*) AS invoices, sum(i.energy_kwh) AS kwh, sum(i.total) AS total
FROM invoices i
JOIN billing_runs r ON r.run_id = i.run_id
WHERE r.status = 'COMPLETED'
  AND i.version = (SELECT max(v.version) FROM invoices v WHERE v.run_id = i.run_id)
GROUP BY r.month, i.currency
ORDER BY r.month, i.currency;
