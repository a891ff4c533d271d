-- Every run of this audit trail that recorded a backup folder, newest first, with the facts retention
-- decides on: its state, its age (database clock), and whether it is pinned. Pinned: the first load
-- (the earliest non-dry run that began copying into the target, i.e. has a migration_audit.partitions
-- row) and any run named in migration_audit.cutovers, whatever the cutover's state.
WITH first_load AS (
    SELECT r.run_id
    FROM migration_audit.runs AS r
    WHERE NOT r.dry_run
      AND EXISTS (SELECT 1 FROM migration_audit.partitions AS p WHERE p.run_id = r.run_id)
    ORDER BY r.started_at, r.run_id
    LIMIT 1
)
SELECT r.run_id,
       r.backup_path,
       r.state,
       r.started_at,
       extract(epoch FROM now() - r.started_at)::double precision AS age_seconds,
       r.run_id IN (SELECT run_id FROM first_load) AS first_load,
       EXISTS (SELECT 1 FROM migration_audit.cutovers AS c WHERE c.run_id = r.run_id) AS cutover
FROM migration_audit.runs AS r
WHERE r.backup_path IS NOT NULL
ORDER BY r.started_at DESC, r.run_id DESC
