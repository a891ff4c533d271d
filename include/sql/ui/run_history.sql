-- The migration page's history of passes: the newest %(limit)s runs of the DAG, with what each pass
-- did (partition counts added up). Figures only, no personal data.
SELECT r.run_id, r.state, r.dry_run, r.started_at, r.finished_at,
       p.partitions, p.done,
       p.rows_in, p.inserted, p.updated, p.unchanged, p.removed, p.rejected, p.fixed
FROM migration_audit.runs AS r
LEFT JOIN LATERAL (
    SELECT count(*) AS partitions, count(*) FILTER (WHERE state = 'done') AS done,
           sum(rows_in)::bigint AS rows_in, sum(inserted)::bigint AS inserted,
           sum(updated)::bigint AS updated, sum(unchanged)::bigint AS unchanged,
           sum(removed)::bigint AS removed, sum(rejected)::bigint AS rejected, sum(fixed)::bigint AS fixed
    FROM migration_audit.partitions AS x
    WHERE x.run_id = r.run_id
) AS p ON true
WHERE r.dag_id = %(dag_id)s
ORDER BY r.started_at DESC, r.run_id DESC
LIMIT %(limit)s
