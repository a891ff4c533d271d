-- The rejects of ids %(lo)s..%(hi)s this pass takes over without reading them again (decision 0013),
-- staged in the temp table carried (source_id, from_run_id, reason). A reject is carried when
-- reading it again could only give the same answer:
-- - its legacy row did not change since the run that read it (from_run_id, the run its sync state
--   names): it is not among %(reread)s (the change log's ids and the drifted ids of this pass);
-- - it was read under this pass's transform settings;
-- - under the same duplicate decision: from_run_id is this run or a run whose plan this run's plan
--   took over (plans.duplicates_from), directly or through others;
-- - it lost no key outside that decision: no kept_id, or the plan's loser to the same kept user (a
--   row rejected by a partition's conflict check or the deferred indexes is decided again);
-- - it is not "born in the future" read on another day than this pass's %(as_of)s.
-- Anything else is read again, as every reject was before.
CREATE TEMP TABLE carried ON COMMIT DROP AS
WITH RECURSIVE chain AS (
    SELECT run_id, duplicates_from FROM migration_audit.plans WHERE run_id = %(run_id)s
    UNION
    SELECT p.run_id, p.duplicates_from
    FROM migration_audit.plans AS p
    JOIN chain AS c ON p.run_id = c.duplicates_from
)
SELECT s.source_id, s.run_id AS from_run_id, r.reason
FROM migration_audit.source_state AS s
JOIN chain AS c ON c.run_id = s.run_id
JOIN migration_audit.plans AS pl ON pl.run_id = s.run_id
JOIN migration_audit.rejected_rows AS r ON r.run_id = s.run_id AND r.source_id = s.source_id
LEFT JOIN unnest(%(reread)s::bigint[]) AS x (id) ON x.id = s.source_id
WHERE s.outcome = 'R' AND s.source_id BETWEEN %(lo)s AND %(hi)s
  AND x.id IS NULL
  AND s.transform_settings = %(transform_settings)s
  AND (s.kept_id IS NULL OR EXISTS (
          SELECT 1 FROM migration_audit.plan_duplicates AS d
          WHERE d.run_id = %(run_id)s AND d.source_id = s.source_id AND d.kept_id = s.kept_id))
  AND NOT (r.reason = %(dob_reason)s AND r.detail = %(dob_future)s
           AND pl.partitions -> 0 ->> 'as_of' IS DISTINCT FROM %(as_of)s);
