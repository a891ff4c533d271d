-- A least-privilege login role for the user_migration DAG (psql script; never run by the DAG).
--
-- Run it as a superuser (or as the owner of the tables involved, with CREATEROLE), in the legacy
-- database, and once more in the target database when that is a separate one:
--
--   psql "postgresql://postgres@db.internal:5432/app" -X -v ON_ERROR_STOP=1 \
--        -v role=migrator -v password='a long random secret' \
--        -f include/sql/roles/least_privilege.sql
--
-- Optional variables: -v legacy_schema=public (where the legacy tables are), -v target_schema=public
-- (where the new tables go), -v legacy_tables=account_user,account_user_groups,account_user_user_permissions
-- (the users table and its two link tables, as named in legacy_mapping).
-- Then use the role in the Airflow connections: postgresql://migrator:<password>@db.internal:5432/app
--
-- What the role may do
--   legacy tables  CONNECT, USAGE on the legacy schema, SELECT on the users table and its two link
--                  tables and SELECT on their id sequences: the backup, the plan, the copy and the
--                  profiles only read them. It cannot UPDATE, DELETE, TRUNCATE, LOCK (beyond
--                  reading), ALTER or DROP them, nor drop a trigger on them (it does not own them).
--   change capture TRIGGER on those three tables and CREATE on the legacy schema: the plan creates
--                  the change log user_migration_changes and the functions user_migration_capture_N
--                  there (the role owns them) and the capture triggers on the tables (capture.py).
--                  The functions are SECURITY DEFINER, so the application's writes append to the log
--                  without any right on it. Without these two grants every pass compares every row
--                  and warns. A trigger that is there but disabled or half-installed can only be
--                  replaced by the tables' owner (PostgreSQL lets only the owner drop a trigger).
--                  The cutover and the rollback need more: the second role, switch_privilege.sql.
--   target         TEMPORARY on the database (each partition stages rows in temp tables); CREATE on
--                  the database, so the DAG can create its audit schema migration_audit; USAGE and
--                  CREATE on the target schema, so the ddl task can create account_newuser and its
--                  neighbours, which the role then owns (it applies later versioned DDL to them, and
--                  moves their id sequences); REFERENCES on auth_group and auth_permission, which the
--                  new link tables' foreign keys point at.
--   nothing else   NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS, no membership in
--                  any other role. Hand the target tables to the application's role after cutover
--                  (ALTER TABLE ... OWNER TO ...) and drop this role when the migration is over.
--
-- migration_audit and the target tables may already exist, created by an earlier run under another
-- role: the DAG creates them with IF NOT EXISTS and versioned DDL, which needs their owner, so this
-- script makes the role their owner (it changes nothing else about them).
--
-- The password is sent in an ALTER ROLE statement: with log_statement = 'ddl' or 'all' the server
-- logs it. Where that matters, run the script with -v password=ignored and set it with \password.

\set ON_ERROR_STOP on
\if :{?role}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v role=NAME -v password=SECRET -f least_privilege.sql'; END $$;
\endif
\if :{?password}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v role=NAME -v password=SECRET -f least_privilege.sql'; END $$;
\endif
\if :{?legacy_schema}
\else
    \set legacy_schema public
\endif
\if :{?target_schema}
\else
    \set target_schema public
\endif
\if :{?legacy_tables}
\else
    \set legacy_tables account_user,account_user_groups,account_user_user_permissions
\endif

BEGIN;

-- The login role (created once per server; a second run in another database only resets it).
SELECT format('CREATE ROLE %I', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format(
    'ALTER ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
    :'role', :'password'
) \gexec

-- This database: connect, temp tables, the audit schema.
SELECT format('GRANT CONNECT, TEMPORARY, CREATE ON DATABASE %I TO %I', current_database(), :'role') \gexec

-- Legacy side (skipped where the legacy tables are not in this database): read only.
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', nspname, :'role')
FROM pg_namespace AS n
WHERE nspname = :'legacy_schema'
  AND EXISTS (
      SELECT FROM pg_class AS c
      WHERE c.relnamespace = n.oid AND c.relname = ANY (string_to_array(:'legacy_tables', ','))
  ) \gexec
SELECT format('GRANT SELECT ON TABLE %I.%I TO %I', n.nspname, c.relname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = :'legacy_schema'
  AND c.relname = ANY (string_to_array(:'legacy_tables', ','))
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \gexec
-- Their id sequences, read only (SELECT: last_value, not nextval or setval): the profiles task moves
-- the target's sequences past every id the legacy tables handed out, deleted users' ids included.
SELECT DISTINCT format('GRANT SELECT ON SEQUENCE %s TO %I', s.oid::regclass, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_depend AS d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid AND d.deptype IN ('a', 'i')
JOIN pg_class AS s ON s.oid = d.objid AND d.classid = 'pg_class'::regclass AND s.relkind = 'S'
WHERE n.nspname = :'legacy_schema'
  AND c.relname = ANY (string_to_array(:'legacy_tables', ',')) \gexec

-- Change capture: triggers on the legacy tables; the log and the trigger functions in their schema.
SELECT format('GRANT TRIGGER ON TABLE %I.%I TO %I', n.nspname, c.relname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = :'legacy_schema'
  AND c.relname = ANY (string_to_array(:'legacy_tables', ','))
  AND c.relkind IN ('r', 'p') \gexec
SELECT format('GRANT CREATE ON SCHEMA %I TO %I', nspname, :'role')
FROM pg_namespace AS n
WHERE nspname = :'legacy_schema'
  AND EXISTS (
      SELECT FROM pg_class AS c
      WHERE c.relnamespace = n.oid AND c.relname = ANY (string_to_array(:'legacy_tables', ','))
  ) \gexec

-- Target side: create the new tables; reference the shared groups and permissions where they are here.
SELECT format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', :'target_schema', :'role') \gexec
SELECT format('GRANT REFERENCES ON TABLE %I.%I TO %I', n.nspname, c.relname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = :'target_schema' AND c.relname IN ('auth_group', 'auth_permission') \gexec

-- Objects an earlier run created under another role become the role's (with their sequences).
SELECT format('ALTER SCHEMA %I OWNER TO %I', nspname, :'role')
FROM pg_namespace
WHERE nspname = 'migration_audit' AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role')
  AND (
      n.nspname = 'migration_audit'
      OR (
          n.nspname = :'target_schema'
          AND c.relname IN (
              'account_newuser', 'account_newuser_groups', 'account_newuser_user_permissions',
              'account_profile', 'address_address', 'account_activity', 'notification_notification'
          )
      )
  ) \gexec
SELECT format('ALTER VIEW %I.%I OWNER TO %I', n.nspname, c.relname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND n.nspname = 'migration_audit'
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role') \gexec
-- The change log and capture functions an earlier run installed under another role: the passes
-- read and empty the log, and the functions run as their owner (SECURITY DEFINER, as capture.py
-- installs them), so they append to the log whoever writes to the legacy tables.
SELECT format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, :'role')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = :'legacy_schema' AND c.relname = 'user_migration_changes' AND c.relkind = 'r'
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER FUNCTION %s OWNER TO %I', p.oid::regprocedure, :'role'),
       format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', p.oid::regprocedure)
FROM pg_proc AS p
JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = :'legacy_schema' AND p.proname ~ '^user_migration_capture_[0-9]+$' AND p.pronargs = 0
  AND p.proowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role') \gexec

COMMIT;

\echo 'role ready:' :role
