-- Whether a log pass must compare sync state and target in full (find_drift.sql), decision 0013:
-- (triggers, foreign_writes, verified). triggers: account_newuser's write triggers in place and
-- enabled (4: insert, update, delete, truncate); foreign_writes: writes to account_newuser noted by
-- them (and the '*' notes: a trigger (re)install, a cutover, a rollback) that are no partition's of
-- a migration run; verified: foreign_writes when the last run that compared everything did it.
-- Counted in this statement's snapshot: a write still in flight is not counted, and changes the
-- count once it commits (target_writes is insert-only).
SELECT
    (SELECT count(*) FROM pg_trigger AS g
     WHERE g.tgrelid = to_regclass('account_newuser') AND g.tgname LIKE 'user\_migration\_writes\_%'
       AND g.tgenabled IN ('O', 'A')) AS triggers,
    (SELECT count(*) FROM migration_audit.target_writes AS w
     WHERE w.table_name IN ('account_newuser', '*')
       AND NOT EXISTS (SELECT 1 FROM migration_audit.partitions AS p WHERE p.xid = w.xid)) AS foreign_writes,
    (SELECT foreign_writes FROM migration_audit.drift_checks ORDER BY checked_at DESC LIMIT 1) AS verified
