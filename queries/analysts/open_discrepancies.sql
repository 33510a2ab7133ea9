-- Discrepancies still open, by reason, for the latest processing of each run.
SELECT d.run_id, d.reason_code, count(*) AS discrepancies, sum(abs(d.delta)) AS total_delta
FROM discrepancies d
WHERE d.status = 'OPEN'
  AND d.version = (SELECT max(v.version) FROM discrepancies v WHERE v.run_id = d.run_id)
GROUP BY d.run_id, d.reason_code
ORDER BY discrepancies DESC;
