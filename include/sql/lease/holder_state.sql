-- The writer lease's holder and whether it is alive, for lease.acquire() (call it in the transaction
-- that locked the lease row, or without a lock just to describe the holder).
-- Inputs: %(lock_class)s, %(lock_obj)s: the two-int key of the lease's advisory lock (lease.LOCK_KEY);
--   %(grace)s: seconds a lock-holding run may be idle between two tasks; %(stale)s: seconds after
--   which any holder without a live advisory lock is presumed dead.
-- Output, one row: run_id, dag_id, hostname, acquired_at, renewed_at; live_pids (other sessions in
--   this database holding the advisory lock: the holder's tasks executing now); lock_aware (the
--   holder takes the advisory lock while its tasks run); in_task (a task of the holder was executing
--   when last seen); past_grace, stale (renewed_at older than grace / stale, and not waiting for an
--   answer: waiting_until unset or past); waiting_until; waiting (waiting_until not yet past).
WITH lock_holders AS (
    SELECT array_agg(l.pid ORDER BY l.pid) AS pids
    FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = %(lock_class)s::oid AND l.objid = %(lock_obj)s::oid AND l.objsubid = 2
)
SELECT w.run_id, w.dag_id, w.hostname, w.acquired_at, w.renewed_at,
       coalesce(h.pids, '{}'::integer[]) AS live_pids,
       w.lock_run_id IS NOT NULL AND w.lock_run_id = w.run_id AS lock_aware,
       cardinality(w.task_pids) > 0 AS in_task,
       w.renewed_at < now() - make_interval(secs => %(grace)s)
           AND (w.waiting_until IS NULL OR w.waiting_until < now()) AS past_grace,
       w.renewed_at < now() - make_interval(secs => %(stale)s)
           AND (w.waiting_until IS NULL OR w.waiting_until < now()) AS stale,
       w.waiting_until,
       coalesce(w.waiting_until > now(), false) AS waiting
FROM migration_audit.writer_lease AS w
CROSS JOIN lock_holders AS h
WHERE w.target = 'target'
