-- The migration page: each planned partition of run %(run_id)s, its state and counts, and how far it
-- got (partition_progress is written between batches while the partition's transaction is open).
-- rows_planned: the ids read when the partition reads a list of ids; else the plan's source rows
-- shared out evenly (the plan splits the ids at percentiles, so each range holds about as many).
WITH plan AS (
    SELECT source_rows, partitions, jsonb_array_length(partitions) AS n
    FROM migration_audit.plans WHERE run_id = %(run_id)s
), planned AS (
    SELECT (e ->> 'partition_no')::int AS partition_no, (e ->> 'lo')::bigint AS lo_id,
           (e ->> 'hi')::bigint AS hi_id, plan.source_rows, plan.n
    FROM plan, jsonb_array_elements(plan.partitions) AS e
)
SELECT pl.partition_no, pl.lo_id, pl.hi_id,
       coalesce(p.state, 'waiting') AS state, coalesce(p.attempts, 0) AS attempts,
       g.path,
       coalesce(g.rows_done, p.transformed, 0) AS rows_done,
       coalesce(g.rows_planned, ceil(pl.source_rows::numeric / greatest(pl.n, 1))::bigint) AS rows_planned,
       g.rows_planned IS NULL AS planned_estimated,
       g.batches,
       extract(epoch FROM coalesce(g.updated_at, p.finished_at, clock_timestamp())
                          - coalesce(g.started_at, p.started_at))::float8 AS seconds_running,
       extract(epoch FROM clock_timestamp() - g.updated_at)::float8 AS seconds_since_update,
       p.rows_in, p.inserted, p.updated, p.unchanged, p.removed, p.rejected, p.fixed, p.seconds,
       p.started_at, p.finished_at
FROM planned AS pl
LEFT JOIN migration_audit.partitions AS p
       ON p.run_id = %(run_id)s AND p.partition_no = pl.partition_no
LEFT JOIN migration_audit.partition_progress AS g
       ON g.run_id = %(run_id)s AND g.partition_no = pl.partition_no
ORDER BY pl.partition_no
