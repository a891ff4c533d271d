-- Ids were copied from the legacy side, so move each identity sequence past the highest id in use:
-- the application's next insert must not collide with a migrated row. Never moves a sequence back.
WITH tables (name, max_id) AS (
    VALUES ('account_newuser', (SELECT max(id) FROM account_newuser)),
           ('account_newuser_groups', (SELECT max(id) FROM account_newuser_groups)),
           ('account_newuser_user_permissions', (SELECT max(id) FROM account_newuser_user_permissions))
),
sequences AS (
    SELECT t.name, t.max_id, pg_get_serial_sequence(t.name, 'id')::regclass AS seq FROM tables AS t
)
SELECT s.name,
       setval(s.seq, GREATEST(coalesce(ps.last_value, 0), coalesce(s.max_id, 0), 1))
FROM sequences AS s
JOIN pg_sequences AS ps ON (quote_ident(ps.schemaname) || '.' || quote_ident(ps.sequencename))::regclass = s.seq
