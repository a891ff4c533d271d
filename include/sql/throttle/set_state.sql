-- Set the throttle by hand, on the target database (what tools/throttle.py runs). Running
-- partitions see it within a second or so, between two batches:
--   %(state)s    'run' (go on), 'pause' (wait between batches until resumed), 'slow' (sleep
--                %(sleep_ms)s milliseconds between batches)
--   %(set_by)s   who set it, for the audit (e.g. the DBA's login)
-- From psql, e.g.: INSERT INTO migration_audit.throttle (state, sleep_ms, set_by)
--   VALUES ('pause', 0, 'alice') ON CONFLICT (target) DO UPDATE SET state = EXCLUDED.state,
--   sleep_ms = EXCLUDED.sleep_ms, set_by = EXCLUDED.set_by, set_at = now();
INSERT INTO migration_audit.throttle AS t (target, state, sleep_ms, set_by, set_at)
VALUES ('target', %(state)s, %(sleep_ms)s, %(set_by)s, now())
ON CONFLICT (target) DO UPDATE SET
    state = EXCLUDED.state,
    sleep_ms = EXCLUDED.sleep_ms,
    set_by = EXCLUDED.set_by,
    set_at = EXCLUDED.set_at
RETURNING state, sleep_ms, set_by, set_at
