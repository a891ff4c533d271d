-- What the validation's results depend on, besides the suite itself (validation_reuse.py):
-- writes: statements noted by the write triggers (an insert-only table, so an equal count is the
-- same set; counted in this snapshot, so a write still in flight is not counted and changes the
-- count once it commits); triggers: how many of the write triggers exist and are enabled;
-- storage: the checked tables' files (a rewrite by ALTER TABLE, VACUUM FULL or CLUSTER changes
-- them without firing a trigger); columns: the checked tables' columns and their types.
-- %(tables)s: the checked tables' names (text[]), resolved in the search path.
WITH checked AS (
    SELECT c.oid, c.relname, c.relfilenode
    FROM unnest(%(tables)s::text[]) AS t (name)
    JOIN pg_class AS c ON c.oid = to_regclass(t.name)
)
SELECT
    (SELECT count(*) FROM migration_audit.target_writes) AS writes,
    (SELECT count(*) FROM pg_trigger AS g JOIN checked AS k ON k.oid = g.tgrelid
     WHERE g.tgname LIKE 'user_migration\_writes\_%%' AND g.tgenabled IN ('O', 'A')) AS triggers,
    (SELECT string_agg(format('%%s:%%s', relname, relfilenode), ',' ORDER BY relname) FROM checked) AS storage,
    (SELECT md5(string_agg(format('%%s.%%s:%%s:%%s:%%s', k.relname, a.attname, a.atttypid, a.atttypmod, a.attnotnull),
                           ',' ORDER BY k.relname, a.attnum))
     FROM checked AS k JOIN pg_attribute AS a ON a.attrelid = k.oid
     WHERE a.attnum > 0 AND NOT a.attisdropped) AS columns
