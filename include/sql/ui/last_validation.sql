-- The migration page's cutover readiness: the newest run with validation results, and how many of
-- its checks passed (names of the failed ones only; no values).
SELECT v.run_id, max(v.validated_at) AS validated_at,
       count(*) FILTER (WHERE v.success) AS passed, count(*) AS checks,
       coalesce(array_agg(v.expectation ORDER BY v.expectation) FILTER (WHERE NOT v.success), '{}') AS failed
FROM migration_audit.validation_results AS v
WHERE v.run_id = (
    SELECT run_id FROM migration_audit.validation_results ORDER BY validated_at DESC LIMIT 1
)
GROUP BY v.run_id
