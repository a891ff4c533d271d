-- Ids were copied from the legacy side, so move each identity sequence past the highest id in use,
-- and past every id the legacy table holds or held (rejected and deleted users' ids stay reserved:
-- a rollback or a fixed reject's re-import must find its own id free). Never moves a sequence back.
-- Inputs: %(account_newuser)s, %(account_newuser_groups)s, %(account_newuser_user_permissions)s:
--         the legacy floor of each table (max id / sequence last value of its legacy table), or NULL.
-- Output: one row per table: (name, the sequence's new last value).
WITH tables (name, max_id, legacy_floor) AS (
    VALUES ('account_newuser', (SELECT max(id) FROM account_newuser), %(account_newuser)s::bigint),
           ('account_newuser_groups', (SELECT max(id) FROM account_newuser_groups),
            %(account_newuser_groups)s::bigint),
           ('account_newuser_user_permissions', (SELECT max(id) FROM account_newuser_user_permissions),
            %(account_newuser_user_permissions)s::bigint)
),
sequences AS (
    SELECT t.name, t.max_id, t.legacy_floor, pg_get_serial_sequence(t.name, 'id')::regclass AS seq
    FROM tables AS t
)
SELECT s.name,
       setval(s.seq, GREATEST(coalesce(ps.last_value, 0), coalesce(s.max_id, 0), coalesce(s.legacy_floor, 0), 1))
FROM sequences AS s
JOIN pg_sequences AS ps ON (quote_ident(ps.schemaname) || '.' || quote_ident(ps.sequencename))::regclass = s.seq
