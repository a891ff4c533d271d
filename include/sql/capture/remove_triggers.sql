-- Remove the capture triggers of one legacy table (install_triggers.sql). {table}, {function}: identifiers.
DROP TRIGGER IF EXISTS user_migration_capture_insert ON {table};
DROP TRIGGER IF EXISTS user_migration_capture_update ON {table};
DROP TRIGGER IF EXISTS user_migration_capture_delete ON {table};
DROP TRIGGER IF EXISTS user_migration_capture_truncate ON {table};
DROP FUNCTION IF EXISTS {function}();
