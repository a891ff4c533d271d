-- A partition's counts, recorded in its own transaction as it finishes (PartitionResult's fields),
-- and that transaction's id: target_writes notes its writes under it (copy/drift_due.sql).
-- consumed adds up over attempts: an attempt that committed and consumed change-log entries stays on
-- record when a later attempt of the same partition finds the log empty.
UPDATE migration_audit.partitions SET
    state = 'done', rows_in = %(rows_in)s, transformed = %(read)s, inserted = %(inserted)s,
    updated = %(updated)s, unchanged = %(unchanged)s, removed = %(removed)s, displaced = %(displaced)s,
    rejected = %(rejected)s, fixed = %(fixed)s, links_in = %(links_in)s,
    drift_repaired = %(drift_repaired)s, consumed = coalesce(consumed, 0) + %(consumed)s,
    snapshots = %(snapshots)s, xid = pg_current_xact_id(), drift_writes = %(drift_writes)s,
    finished_at = clock_timestamp(), seconds = %(seconds)s, error = NULL
WHERE run_id = %(run_id)s AND partition_no = %(partition_no)s
