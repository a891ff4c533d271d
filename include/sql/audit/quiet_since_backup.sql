-- The newest successful run that wrote a backup, provided that it and every run after it changed
-- nothing: each found its changes in the trusted change log (plans.changes = 'log': a full pass may
-- have run while changes went unlogged), each of their partitions consumed no change-log entry in
-- any attempt (consumed adds up over attempts) and changed no user, and none of them still runs.
-- Then that backup still equals the legacy tables and a new pass may skip its own.
-- Returns (run_id, backup_path) or no row.
WITH last_backup AS (
    SELECT run_id, backup_path, started_at
    FROM migration_audit.runs
    WHERE backup_path IS NOT NULL AND state = 'success' AND NOT dry_run
    ORDER BY started_at DESC
    LIMIT 1
)
SELECT b.run_id, b.backup_path
FROM last_backup AS b
-- By when partitions finished and plans were made, not by when runs started: a backfill's runs
-- start in one order and take the writer lease (and copy) in another.
WHERE NOT EXISTS (
    SELECT 1
    FROM migration_audit.partitions AS p
    WHERE p.run_id NOT IN (b.run_id, %(run_id)s)
      AND coalesce(p.finished_at, 'infinity') >= b.started_at
      AND (p.consumed IS NULL OR p.consumed > 0 OR p.inserted > 0 OR p.updated > 0 OR p.removed > 0)
)
AND NOT EXISTS (
    SELECT 1
    FROM migration_audit.partitions AS p
    WHERE p.run_id = b.run_id
      AND (p.consumed IS NULL OR p.consumed > 0 OR p.inserted > 0 OR p.updated > 0 OR p.removed > 0)
)
AND NOT EXISTS (
    SELECT 1 FROM migration_audit.runs AS r
    WHERE r.started_at >= b.started_at AND r.run_id <> %(run_id)s AND r.state NOT IN ('success', 'skipped_after_cutover')
)
AND NOT EXISTS (
    SELECT 1
    FROM migration_audit.plans AS pl
    JOIN migration_audit.runs AS r ON r.run_id = pl.run_id
    WHERE pl.planned_at >= b.started_at AND r.run_id <> %(run_id)s AND NOT r.dry_run
      AND pl.changes IS DISTINCT FROM 'log'
)
