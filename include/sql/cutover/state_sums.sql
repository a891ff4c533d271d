-- The sync state's totals: (moved rows, rejected rows, sum of the moved rows' fingerprints).
SELECT count(*) FILTER (WHERE outcome = 'M'), count(*) FILTER (WHERE outcome = 'R'),
       coalesce(sum(fingerprint::numeric) FILTER (WHERE outcome = 'M'), 0)
FROM migration_audit.source_state
