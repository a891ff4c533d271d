-- After every partition of run %(run_id)s has copied: when each compared sync state and target in
-- full (drift_writes set; find_drift.sql, repairing what it found), record the run as the drift
-- comparison's proof, with the fewest other writes any of them saw (a write noted between two of
-- them makes the count differ, and the next pass compares again). Nothing otherwise.
INSERT INTO migration_audit.drift_checks (run_id, foreign_writes)
SELECT %(run_id)s, min(p.drift_writes)
FROM migration_audit.partitions AS p
WHERE p.run_id = %(run_id)s
HAVING count(*) = (SELECT jsonb_array_length(partitions) FROM migration_audit.plans WHERE run_id = %(run_id)s)
   AND bool_and(p.state = 'done' AND p.drift_writes IS NOT NULL)
ON CONFLICT (run_id) DO UPDATE SET foreign_writes = EXCLUDED.foreign_writes, checked_at = clock_timestamp()
RETURNING foreign_writes
