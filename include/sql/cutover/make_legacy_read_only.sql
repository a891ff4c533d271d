-- Make one legacy table read-only after the cutover: every write fails with a message that names
-- the new table. {function}, {table}: identifiers; {target}, {run_id}: literals (trigger args).
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'read_only_sql_transaction',
        MESSAGE = format('%s is read-only: users moved to %s at the cutover of run %s',
                         TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1]),
        HINT = format('write to %s instead', TG_ARGV[0]);
END
$fn$;
-- CREATE OR REPLACE (PostgreSQL 14+), not DROP + CREATE: DROP TRIGGER takes an ACCESS EXCLUSIVE
-- lock, which under the cutover's EXCLUSIVE lock would wait for every open read of the table.
CREATE OR REPLACE TRIGGER user_migration_read_only
    BEFORE INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}({target}, {run_id});
CREATE OR REPLACE TRIGGER user_migration_read_only_truncate
    BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}({target}, {run_id});
