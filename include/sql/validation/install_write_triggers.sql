-- Statement-level triggers that note in migration_audit.target_writes every statement that changed
-- rows of {table} (a table the validation checks), whoever ran it: a pass, a cutover, a rollback or
-- someone by hand. A TRUNCATE is noted whatever it removed. The validation takes over the results
-- of an earlier suite only while nothing new is noted (validation_reuse.py). Statement-level with
-- transition tables: one row per statement that changed something, none for a statement that
-- changed nothing (a quiet pass's merges). SECURITY DEFINER: a role that may write the table but not
-- the audit schema (a DBA, the application) is noted too, never refused. Idempotent; {table}: the
-- table's identifier.
CREATE OR REPLACE FUNCTION migration_audit.note_target_write() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO migration_audit.target_writes (table_name, op) VALUES (TG_TABLE_NAME, TG_OP);
    ELSIF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM old_rows) THEN
            INSERT INTO migration_audit.target_writes (table_name, op) VALUES (TG_TABLE_NAME, TG_OP);
        END IF;
    ELSIF EXISTS (SELECT 1 FROM new_rows) THEN
        INSERT INTO migration_audit.target_writes (table_name, op) VALUES (TG_TABLE_NAME, TG_OP);
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS user_migration_writes_insert ON {table};
DROP TRIGGER IF EXISTS user_migration_writes_update ON {table};
DROP TRIGGER IF EXISTS user_migration_writes_delete ON {table};
DROP TRIGGER IF EXISTS user_migration_writes_truncate ON {table};
CREATE TRIGGER user_migration_writes_insert AFTER INSERT ON {table}
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.note_target_write();
CREATE TRIGGER user_migration_writes_update AFTER UPDATE ON {table}
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.note_target_write();
CREATE TRIGGER user_migration_writes_delete AFTER DELETE ON {table}
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.note_target_write();
CREATE TRIGGER user_migration_writes_truncate AFTER TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.note_target_write();
