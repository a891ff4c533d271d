-- The highest id a legacy table holds or has handed out: its max id and the last value of the
-- sequence behind its id column (serial or identity), read on the legacy connection.
-- Inputs: {table} the legacy table, {id} its id column (identifiers); %(qualified)s the same table
--         as quoted text and %(column)s the column's name, for pg_get_serial_sequence.
-- Output: one row (max_id, has_sequence, readable, last_value): max_id NULL for an empty table;
--         readable false when this role may not read the sequence (last_value is then NULL too,
--         as it is for a sequence never used).
WITH s AS (
    SELECT pg_get_serial_sequence(%(qualified)s, %(column)s)::regclass AS seq
)
SELECT (SELECT max({id}) FROM {table}) AS max_id,
       s.seq IS NOT NULL AS has_sequence,
       coalesce(has_sequence_privilege(s.seq, 'SELECT,USAGE'), false) AS readable,
       ps.last_value
FROM s
LEFT JOIN pg_sequences AS ps
       ON (quote_ident(ps.schemaname) || '.' || quote_ident(ps.sequencename))::regclass = s.seq
