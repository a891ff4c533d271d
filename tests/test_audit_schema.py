"""The audit schema is created once per version of its file, without waiting on running partitions."""

from __future__ import annotations

import psycopg

from user_migration.db import ensure_audit_schema


def test_a_task_starting_while_a_partition_writes_does_not_wait_for_it(make_db):
    """Every task calls ensure_audit_schema; a partition's open transaction must not hold it up.

    Its IF NOT EXISTS DDL locks the audit tables even when there is nothing to do, which made each
    mapped partition wait for the one before it to commit.
    """
    dsn = make_db("audit")
    with psycopg.connect(dsn, autocommit=True) as first:
        ensure_audit_schema(first)
    with psycopg.connect(dsn) as partition, psycopg.connect(dsn, autocommit=True) as task:
        partition.execute(  # a partition's transaction, still open
            "INSERT INTO migration_audit.rejected_rows (run_id, source_id, reason, source_row) "
            "VALUES ('run', 1, 'invalid_email', '{}')"
        )
        partition.execute(
            "INSERT INTO migration_audit.source_state (source_id, row_hash, outcome, run_id) "
            "VALUES (1, '\\x00', 'R', 'run')"
        )
        task.execute("SET lock_timeout = '1s'")
        ensure_audit_schema(task)  # raised LockNotAvailable before the version check
        partition.rollback()


def test_an_edited_schema_file_is_applied_again(make_db, monkeypatch):
    dsn = make_db("audit")
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_audit_schema(conn)
        conn.execute("UPDATE migration_audit.audit_schema_version SET sha256 = 'an older version'")
        conn.execute("DROP TABLE migration_audit.writer_lease")
        ensure_audit_schema(conn)
        assert conn.execute("SELECT to_regclass('migration_audit.writer_lease')").fetchone()[0] is not None
        assert conn.execute("SELECT sha256 FROM migration_audit.audit_schema_version").fetchone()[0] != (
            "an older version"
        )
