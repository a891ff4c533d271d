-- Sessions holding locks that keep the cutover from locking its tables (no query text: it
-- may quote user data). %(tables)s: the tables' regclass oids.
SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), '?') AS application_name, a.state,
       round(extract(epoch FROM now() - a.xact_start))::int AS transaction_seconds
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.relation = ANY(%(tables)s) AND l.granted AND l.pid <> pg_backend_pid()
  AND l.mode <> 'AccessShareLock'
ORDER BY a.pid
