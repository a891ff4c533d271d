-- Undo make_legacy_read_only.sql for one legacy table. {table}: identifier.
DROP TRIGGER IF EXISTS user_migration_read_only ON {table};
DROP TRIGGER IF EXISTS user_migration_read_only_truncate ON {table};
