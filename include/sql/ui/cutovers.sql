-- The migration page's cutovers and rollbacks, newest first: state, times, counts and whether the
-- checksums matched. Who cut over or rolled back is left out (a person's name).
SELECT id, run_id, state, cut_at, source_rows, target_rows, rejected_rows,
       source_checksum = target_checksum AS checksums_match, pause_seconds, lock_attempts, rolled_back_at
FROM migration_audit.cutovers
ORDER BY id DESC
LIMIT 20
