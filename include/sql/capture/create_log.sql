-- The change log of the legacy tables (see capture.py), in the legacy database: one row per legacy
-- row written by the application, appended by the capture triggers in the writer's own transaction.
-- {log}: the log table's qualified name. source: 0 the users table, 1 groups, 2 permissions;
-- source_id: the user's id (NULL: a TRUNCATE, after which only a full comparison can be trusted);
-- op: I (a row appeared), D (a row vanished), U (changed); only the users table's I and D
-- change the count of users (cutover.py counts with them).
CREATE TABLE IF NOT EXISTS {log} (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source     smallint NOT NULL,
    source_id  bigint NULL,
    op         char(1) NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {log_index} ON {log} (source_id);
