-- Remove the triggers of track_changes.sql before the cutover commits.
DROP TRIGGER IF EXISTS user_migration_cutover_insert ON account_newuser;
DROP TRIGGER IF EXISTS user_migration_cutover_update ON account_newuser;
DROP TRIGGER IF EXISTS user_migration_cutover_delete ON account_newuser;
DROP TRIGGER IF EXISTS user_migration_cutover_insert ON migration_audit.source_state;
DROP TRIGGER IF EXISTS user_migration_cutover_update ON migration_audit.source_state;
DROP TRIGGER IF EXISTS user_migration_cutover_delete ON migration_audit.source_state;
