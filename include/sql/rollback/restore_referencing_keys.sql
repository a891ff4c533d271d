-- Foreign keys of tables outside the restore that point at one restored table (%(table)s, its
-- quoted qualified name): the referencing table (schema, name, and as text for messages), the
-- constraint, and its columns paired with the referenced ones. The restore refuses when a row of
-- such a table would lose the row it points at.
SELECT rn.nspname, r.relname, c.conrelid::regclass::text, c.conname, fk.columns, pk.columns
FROM pg_constraint AS c
JOIN pg_class AS r ON r.oid = c.conrelid
JOIN pg_namespace AS rn ON rn.oid = r.relnamespace
CROSS JOIN LATERAL (
    SELECT array_agg(a.attname::text ORDER BY k.n)
    FROM unnest(c.conkey) WITH ORDINALITY AS k (attnum, n)
    JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
) AS fk (columns)
CROSS JOIN LATERAL (
    SELECT array_agg(a.attname::text ORDER BY k.n)
    FROM unnest(c.confkey) WITH ORDINALITY AS k (attnum, n)
    JOIN pg_attribute AS a ON a.attrelid = c.confrelid AND a.attnum = k.attnum
) AS pk (columns)
WHERE c.contype = 'f'
  AND c.confrelid = %(table)s::regclass
  AND c.conrelid <> ALL (%(restored)s::regclass[])
ORDER BY 3, 4
