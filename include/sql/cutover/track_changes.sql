-- Inside the cutover's transaction only: what the final sync changes in account_newuser and in the
-- sync state, summed by statement-level triggers from the transition tables into the temp table
-- cutover_deltas, so the proof under the lock adds these deltas to the sums verified before the lock
-- instead of scanning both tables again. Whatever the sync did, the triggers see every row it
-- wrote. Dropped before the commit (cutover/untrack_changes.sql); a rollback removes them too.
-- The fingerprint placeholder takes row_fingerprint.sql (over account_newuser's bare column names).
CREATE TEMP TABLE IF NOT EXISTS cutover_deltas (
    subject   text NOT NULL,
    rows      bigint NOT NULL,
    moved     bigint NOT NULL,
    rejected  bigint NOT NULL,
    checksum  numeric NOT NULL
) ON COMMIT DROP;
TRUNCATE cutover_deltas;

CREATE OR REPLACE FUNCTION migration_audit.cutover_track_target() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO cutover_deltas
        SELECT 'target', -count(*), 0, 0, -coalesce(sum((
{fingerprint}
        )::numeric), 0) FROM old_rows;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO cutover_deltas
        SELECT 'target', count(*), 0, 0, coalesce(sum((
{fingerprint}
        )::numeric), 0) FROM new_rows;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION migration_audit.cutover_track_state() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO cutover_deltas
        SELECT 'state', -count(*), -count(*) FILTER (WHERE outcome = 'M'), -count(*) FILTER (WHERE outcome = 'R'),
               -coalesce(sum(fingerprint::numeric) FILTER (WHERE outcome = 'M'), 0)
        FROM old_rows;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO cutover_deltas
        SELECT 'state', count(*), count(*) FILTER (WHERE outcome = 'M'), count(*) FILTER (WHERE outcome = 'R'),
               coalesce(sum(fingerprint::numeric) FILTER (WHERE outcome = 'M'), 0)
        FROM new_rows;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER user_migration_cutover_insert AFTER INSERT ON account_newuser
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.cutover_track_target();
CREATE TRIGGER user_migration_cutover_update AFTER UPDATE ON account_newuser
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.cutover_track_target();
CREATE TRIGGER user_migration_cutover_delete AFTER DELETE ON account_newuser
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.cutover_track_target();
CREATE TRIGGER user_migration_cutover_insert AFTER INSERT ON migration_audit.source_state
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.cutover_track_state();
CREATE TRIGGER user_migration_cutover_update AFTER UPDATE ON migration_audit.source_state
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.cutover_track_state();
CREATE TRIGGER user_migration_cutover_delete AFTER DELETE ON migration_audit.source_state
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION migration_audit.cutover_track_state();
