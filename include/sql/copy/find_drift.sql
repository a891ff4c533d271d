-- Where the sync state and account_newuser disagree in ids %(lo)s..%(hi)s, which a delta pass would
-- otherwise never look at again (their legacy rows did not change): ids the state records as
-- migrated that the target lacks (a manual delete, a displaced holder), target rows of ids the state
-- records as rejected, and target rows the state does not know (a restore, a manual insert).
-- Returns (id, kind) in id order. One full join of the two id ranges: each side is read once,
-- restricted to the range (for 500k ids of 1M: 0.60 s; anti-joins against the other whole table, 0.96 s).
SELECT coalesce(s.source_id, t.id) AS id,
       CASE WHEN s.source_id IS NULL THEN 'unknown' WHEN t.id IS NULL THEN 'missing' ELSE 'rejected' END AS kind
FROM (
    SELECT source_id, outcome FROM migration_audit.source_state
    WHERE source_id BETWEEN %(lo)s AND %(hi)s
) AS s
FULL JOIN (
    SELECT id FROM account_newuser WHERE id BETWEEN %(lo)s AND %(hi)s
) AS t ON t.id = s.source_id
WHERE (t.id IS NULL AND s.outcome = 'M')
   OR (s.source_id IS NULL)
   OR (s.outcome = 'R' AND t.id IS NOT NULL)
ORDER BY 1
