-- Load on the legacy server, read by the throttle between batches (throttle.py): client backends
-- running a statement now, and client backends waiting for a lock. The migration's own sessions
-- (application_name user_migration...) and this one are left out: the throttle yields to the
-- application, not to itself. Without pg_read_all_stats (pg_monitor) the state of other roles'
-- sessions reads NULL, so only this role's sessions count (the throttle says so once).
SELECT
    count(*) FILTER (WHERE state = 'active') AS active_backends,
    count(*) FILTER (WHERE wait_event_type = 'Lock') AS lock_waiters
FROM pg_stat_activity
WHERE backend_type = 'client backend'
  AND pid <> pg_backend_pid()
  AND coalesce(application_name, '') NOT LIKE 'user\_migration%'
