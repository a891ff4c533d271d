-- Capture the changes of one legacy table into the change log (create_log.sql): statement-level
-- AFTER triggers with transition tables, so a statement that writes many rows appends its ids in
-- one INSERT. PostgreSQL allows one event per trigger when transition tables are used, hence three,
-- plus one for TRUNCATE. {function}, {table}, {log}, {column} (the user id column): identifiers;
-- {source}: the table's number in the log. Idempotent.
-- SECURITY DEFINER: the function runs as its owner (the role that installed it, which owns the log),
-- not as the application's role writing to the legacy table, which has no right on the log; a
-- trigger function cannot be called directly, and search_path is pinned ({log} is qualified).
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {log} (source, source_id, op) SELECT DISTINCT {source}, {column}, 'I' FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {log} (source, source_id, op) SELECT DISTINCT {source}, {column}, 'D' FROM old_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        -- An update that changes a user's id makes one user vanish and another appear.
        INSERT INTO {log} (source, source_id, op)
        SELECT {source}, coalesce(n.id, o.id),
               CASE WHEN o.id IS NULL THEN 'I' WHEN n.id IS NULL THEN 'D' ELSE 'U' END
        FROM (SELECT DISTINCT {column} AS id FROM new_rows) AS n
        FULL JOIN (SELECT DISTINCT {column} AS id FROM old_rows) AS o ON o.id = n.id;
    ELSE
        INSERT INTO {log} (source, source_id, op) VALUES ({source}, NULL, 'U');
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS user_migration_capture_insert ON {table};
CREATE TRIGGER user_migration_capture_insert AFTER INSERT ON {table}
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}();
DROP TRIGGER IF EXISTS user_migration_capture_update ON {table};
CREATE TRIGGER user_migration_capture_update AFTER UPDATE ON {table}
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}();
DROP TRIGGER IF EXISTS user_migration_capture_delete ON {table};
CREATE TRIGGER user_migration_capture_delete AFTER DELETE ON {table}
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}();
DROP TRIGGER IF EXISTS user_migration_capture_truncate ON {table};
CREATE TRIGGER user_migration_capture_truncate AFTER TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
