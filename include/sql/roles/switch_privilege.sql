-- The switch role of the user_migration DAG: the cutover, its rehearsal, carry_back and restore
-- (psql script; never run by the DAG). Passes use the role of least_privilege.sql; this one is for
-- the run with cutover=true and for the user_migration_rollback DAG only.
--
-- Run it as a superuser, after least_privilege.sql, in the legacy database, and once more in the
-- target database when that is a separate one:
--
--   psql "postgresql://postgres@db.internal:5432/app" -X -v ON_ERROR_STOP=1 \
--        -v role=migrator_switch -v password='another long random secret' -v pass_role=migrator \
--        -f include/sql/roles/switch_privilege.sql
--
-- Optional variables, as in least_privilege.sql: -v legacy_schema=public,
-- -v legacy_tables=account_user,account_user_groups,account_user_user_permissions.
-- Then point legacy_conn_id and target_conn_id of the cutover run (and of the rollback DAG) at
-- connections that log in as this role.
--
-- What the switch does, and what PostgreSQL asks for it
--   cutover        LOCK the legacy tables IN EXCLUSIVE MODE (UPDATE, DELETE or TRUNCATE privilege;
--                  MAINTAIN too from PostgreSQL 17), drop the change-capture triggers and create
--                  the read-only ones (DROP TRIGGER: only the table's owner, there is no privilege
--                  for it in any version, 13 to 18), create the read-only function (CREATE on the
--                  legacy schema), drop the change log and the capture functions (their owner, the
--                  pass role); on the target: the final sync, the proof's triggers and temp table.
--   carry_back     drop the read-only triggers (owner again), INSERT/UPDATE/DELETE the legacy rows,
--                  move their id sequences (setval: UPDATE on the sequence), temp tables.
--   restore        temp tables, LOCK, DELETE/UPDATE/INSERT, setval, drop the read-only triggers.
-- Because dropping a trigger needs the owner, the role is made a member of the role owning the
-- legacy tables (it acts with that owner's rights, inheriting them: it can ALTER or DROP the legacy
-- tables and use everything else that owner owns) and of the pass role (the target tables,
-- migration_audit, the change log). It is NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
-- NOBYPASSRLS. Give the legacy tables an owner of their own where that is too wide; create this role
-- just before the cutover and drop it (DROP OWNED BY, DROP ROLE) once the migration is over.
-- The script refuses when a superuser owns the legacy tables: membership would then hand out
-- ownership of the system catalogs; give the tables their application's owner first
-- (ALTER TABLE ... OWNER TO app).
--
-- The password is sent in an ALTER ROLE statement: with log_statement = 'ddl' or 'all' the server
-- logs it. Where that matters, run the script with -v password=ignored and set it with \password.

\set ON_ERROR_STOP on
\if :{?role}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v role=NAME -v password=SECRET -v pass_role=NAME -f switch_privilege.sql'; END $$;
\endif
\if :{?password}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v role=NAME -v password=SECRET -v pass_role=NAME -f switch_privilege.sql'; END $$;
\endif
\if :{?pass_role}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v role=NAME -v password=SECRET -v pass_role=NAME -f switch_privilege.sql'; END $$;
\endif
\if :{?legacy_schema}
\else
    \set legacy_schema public
\endif
\if :{?legacy_tables}
\else
    \set legacy_tables account_user,account_user_groups,account_user_user_permissions
\endif

BEGIN;

-- The pass role must exist (least_privilege.sql); a superuser owner of the legacy tables is refused.
SELECT format(
    'DO $raise$ BEGIN RAISE EXCEPTION USING MESSAGE = %L; END $raise$',
    format('the pass role %s does not exist: run least_privilege.sql first', :'pass_role')
)
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'pass_role') \gexec
SELECT format(
    'DO $raise$ BEGIN RAISE EXCEPTION USING MESSAGE = %L; END $raise$',
    format(
        'the legacy table %s.%s is owned by the superuser %s: the switch role would inherit its ownership of '
        'the system catalogs. Give the legacy tables a non-superuser owner first (ALTER TABLE ... OWNER TO '
        'the application''s role), then run this script again',
        n.nspname, c.relname, r.rolname
    )
)
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_roles AS r ON r.oid = c.relowner
WHERE n.nspname = :'legacy_schema'
  AND c.relname = ANY (string_to_array(:'legacy_tables', ','))
  AND r.rolsuper
LIMIT 1 \gexec

-- The login role (created once per server; a second run in another database only resets it).
SELECT format('CREATE ROLE %I', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format(
    'ALTER ROLE %I LOGIN INHERIT PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
    :'role', :'password'
) \gexec

-- This database: connect and temp tables (the final sync, carry_back and restore stage rows there).
SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), :'role') \gexec

-- The pass role's objects: the target tables, migration_audit, the change log and capture functions.
SELECT format('GRANT %I TO %I', :'pass_role', :'role')
WHERE NOT pg_has_role(:'role', :'pass_role', 'MEMBER') \gexec

-- Legacy side (skipped where the legacy tables are not in this database): their owner's rights.
SELECT DISTINCT format('GRANT %I TO %I', r.rolname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_roles AS r ON r.oid = c.relowner
WHERE n.nspname = :'legacy_schema'
  AND c.relname = ANY (string_to_array(:'legacy_tables', ','))
  AND c.relkind IN ('r', 'p')
  AND NOT pg_has_role(:'role', r.oid, 'MEMBER') \gexec

COMMIT;

\echo 'switch role ready:' :role
