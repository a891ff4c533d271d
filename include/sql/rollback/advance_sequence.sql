-- Move the sequence behind column {column} of {qualified} past the largest value in the column,
-- never back: ids that a restore or a rollback deleted are not handed out again. {qualified} is
-- the quoted, schema-qualified table name and {column} the column name as is (both literals, as
-- pg_get_serial_sequence wants them); {table}, {ident}: the same as identifiers. A column without
-- a sequence, or an empty table, gives no row and changes nothing.
SELECT setval(s.seq, GREATEST(coalesce(ps.last_value, 0), m.top))
FROM (SELECT pg_get_serial_sequence({qualified}, {column})::regclass AS seq) AS s
JOIN pg_sequences AS ps
  ON (quote_ident(ps.schemaname) || '.' || quote_ident(ps.sequencename))::regclass = s.seq
CROSS JOIN (SELECT max({ident}) AS top FROM {table}) AS m
WHERE m.top IS NOT NULL AND m.top > coalesce(ps.last_value, 0)
