-- A running partition's progress (throttle.Throttle.progress), from the throttle's own autocommit
-- connection so that it is seen while the partition's transaction is open. Batch 0 starts the attempt
-- again (a retry redoes the partition whole). Figures only, no personal data.
INSERT INTO migration_audit.partition_progress (run_id, partition_no, path, rows_done, rows_planned, batches)
VALUES (%(run_id)s, %(partition_no)s, %(path)s, %(rows_done)s, %(rows_planned)s, %(batches)s)
ON CONFLICT (run_id, partition_no) DO UPDATE SET
    path = EXCLUDED.path,
    rows_done = EXCLUDED.rows_done,
    rows_planned = EXCLUDED.rows_planned,
    batches = EXCLUDED.batches,
    started_at = CASE WHEN EXCLUDED.batches = 0 THEN clock_timestamp()
                      ELSE migration_audit.partition_progress.started_at END,
    updated_at = clock_timestamp()
