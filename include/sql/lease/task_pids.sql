-- A task of the holding run starts (%(joining)s true) or ends (false) on this session: renew the
-- lease (ending any wait for an answer) and list this session's backend pid among the holder's executing tasks, or take it off.
-- Entries of sessions that no longer hold the advisory lock (tasks that died) are dropped on the way.
-- Inputs: %(run_id)s: the run the task belongs to (nothing changes unless it holds the lease);
--   %(lock_class)s, %(lock_obj)s: the advisory lock's key (lease.LOCK_KEY); %(joining)s: boolean.
-- Output: the number of lease rows updated (1, or 0 when the run does not hold the lease).
UPDATE migration_audit.writer_lease AS w
SET renewed_at = now(),
    waiting_until = NULL,
    lock_run_id = w.run_id,
    task_pids = ARRAY(
        SELECT p FROM unnest(w.task_pids) AS p
        WHERE p <> pg_backend_pid()
          AND p IN (
              SELECT l.pid FROM pg_locks AS l
              WHERE l.locktype = 'advisory' AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = %(lock_class)s::oid AND l.objid = %(lock_obj)s::oid AND l.objsubid = 2
          )
    ) || CASE WHEN %(joining)s THEN ARRAY[pg_backend_pid()] ELSE '{}'::integer[] END
WHERE w.target = 'target' AND w.run_id = %(run_id)s
