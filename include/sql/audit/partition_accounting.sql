-- Every legacy row a run's partitions read, counted independently on the target side: per planned
-- partition, the users account_newuser holds in its id range and the run's rejects in that range.
-- Input: %(run_id)s. Output: one row per partition of the run's plan, in order: (partition_no,
-- lo_id, hi_id, rows_in, in_target, rejected, target_total); rows_in is NULL for a partition that
-- has not finished, target_total is count(*) of account_newuser (the plan's ranges are disjoint, so
-- target_total - sum(in_target) is the number of users outside every range).
WITH planned AS (
    SELECT (e ->> 'partition_no')::int AS partition_no, (e ->> 'lo')::bigint AS lo_id,
           (e ->> 'hi')::bigint AS hi_id
    FROM migration_audit.plans AS pl, jsonb_array_elements(pl.partitions) AS e
    WHERE pl.run_id = %(run_id)s
)
SELECT d.partition_no, d.lo_id, d.hi_id,
       p.rows_in,
       (SELECT count(*) FROM account_newuser AS u WHERE u.id BETWEEN d.lo_id AND d.hi_id) AS in_target,
       (SELECT count(*) FROM migration_audit.run_rejects AS r
        WHERE r.run_id = %(run_id)s AND r.source_id BETWEEN d.lo_id AND d.hi_id) AS rejected,
       (SELECT count(*) FROM account_newuser) AS target_total
FROM planned AS d
LEFT JOIN migration_audit.partitions AS p
       ON p.run_id = %(run_id)s AND p.partition_no = d.partition_no AND p.state = 'done'
ORDER BY d.partition_no
