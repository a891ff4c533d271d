-- The facts that decide whether a plan may take over the duplicate decision of the last plan
-- (plan.reusable_decision) instead of scanning the legacy table again. That decision still holds
-- when the legacy table has not changed since the snapshot it was made in: the change log was
-- trusted and is empty now (checked by the caller), the base run's partitions consumed exactly the
-- entries its plan's snapshot saw (they consume a superset of them, so an equal count means none
-- committed after that snapshot), and no run since consumed any.
-- The base is the newest plan (by when it was made) of another run that is not a dry run. Runs
-- are ordered by their plans and partitions, never by runs.started_at: a backfill's runs, or a
-- cleared older run, start in one order and take the writer lease in another.
-- consumed_since counts the entries consumed by partitions of other runs that finished after the
-- base plan was made (or have not finished): changes applied under a decision that never saw them.
-- Returns one row or none:
-- (run_id, duplicates, log_entries, consumed, consumed_since, transform_settings, as_of,
--  decisions stored, partitions planned, partitions done, rejects "in the future" of the base run).
WITH base AS (
    SELECT p.run_id, p.duplicates, p.log_entries, p.transform_settings, p.planned_at,
           p.partitions -> 0 ->> 'as_of' AS as_of, jsonb_array_length(p.partitions) AS planned
    FROM migration_audit.plans AS p
    JOIN migration_audit.runs AS r ON r.run_id = p.run_id
    WHERE p.run_id <> %(run_id)s AND NOT r.dry_run
    ORDER BY p.planned_at DESC
    LIMIT 1
)
SELECT b.run_id, b.duplicates, b.log_entries,
       (SELECT coalesce(sum(d.consumed), 0) FROM migration_audit.partitions AS d WHERE d.run_id = b.run_id),
       (SELECT coalesce(sum(d.consumed), 0)
        FROM migration_audit.partitions AS d
        WHERE d.run_id NOT IN (b.run_id, %(run_id)s)
          AND coalesce(d.finished_at, 'infinity') >= b.planned_at),
       b.transform_settings, b.as_of,
       (SELECT count(*) FROM migration_audit.plan_duplicates AS x WHERE x.run_id = b.run_id),
       b.planned,
       (SELECT count(*) FROM migration_audit.partitions AS d WHERE d.run_id = b.run_id AND d.state = 'done'),
       (SELECT count(*) FROM migration_audit.run_rejects AS x
        WHERE x.run_id = b.run_id AND x.reason = %(dob_reason)s AND x.detail = %(dob_future)s)
FROM base AS b
