"""A first load fills the link tables without their foreign keys; finalize adds them back, validated."""

from __future__ import annotations

import datetime as dt
import threading
import time

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import run_stages, snapshot

from user_migration import audit, deferred_keys
from user_migration.backup import run_backup
from user_migration.config import Settings
from user_migration.db import ensure_audit_schema
from user_migration.errors import MigrationError
from user_migration.finalize import finalize_target
from user_migration.partition_copy import copy_partition
from user_migration.plan import make_plan
from user_migration.schema import apply_schema

LINK_TABLES = ("account_newuser_groups", "account_newuser_user_permissions")
TARGET_TABLES = ("account_newuser", *LINK_TABLES, "account_profile")
KEYS = {
    "account_newuser_groups_group_id_fk",
    "account_newuser_groups_newuser_id_fkey",
    "account_newuser_user_permissions_newuser_id_fkey",
    "account_newuser_user_permissions_permission_id_fk",
}


def _schema(conn: psycopg.Connection) -> dict[str, set[tuple]]:
    """What a normal load leaves: constraints (validated or not), indexes, and the keys' triggers."""
    return {
        "constraints": set(
            conn.execute(
                "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid), convalidated, "
                "condeferrable, condeferred FROM pg_constraint WHERE conrelid = ANY(%s::regclass[])",
                (list(TARGET_TABLES),),
            ).fetchall()
        ),
        "indexes": set(
            conn.execute(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)",
                (list(TARGET_TABLES),),
            ).fetchall()
        ),
        # The RI triggers' names carry oids; what they do does not.
        "triggers": set(
            conn.execute(
                "SELECT t.tgrelid::regclass::text, c.conname, t.tgfoid::regproc::text, t.tgtype, t.tgenabled, "
                "t.tgdeferrable, t.tginitdeferred FROM pg_trigger AS t JOIN pg_constraint AS c ON c.oid = t.tgconstraint "
                "WHERE c.conrelid = ANY(%s::regclass[])",
                (list(TARGET_TABLES),),
            ).fetchall()
        ),
    }


def _link_keys(conn: psycopg.Connection) -> dict[str, bool]:
    """Foreign keys of the link tables: name -> validated."""
    return dict(
        conn.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f' AND conrelid = ANY(%s::regclass[])",
            (list(LINK_TABLES),),
        ).fetchall()
    )


def _links(dsn: str) -> dict[str, list[tuple]]:
    """The target's group and permission links, as support.pipeline.snapshot reads them."""
    migrated = snapshot(dsn)
    return {"groups": migrated["groups"], "permissions": migrated["permissions"]}


def _plan(conn: psycopg.Connection, settings: Settings, run_id: str, backup_dir) -> dict:
    ensure_audit_schema(conn)
    audit.start_run(conn, run_id, "user_migration", None, False, settings.public())
    run_backup(conn, settings.mapping, backup_dir, run_id)
    apply_schema(conn, run_id)
    return make_plan(conn, conn, settings, run_id, dt.date.today())


def _copy_all(dsn: str, conn: psycopg.Connection, settings: Settings, run_id: str, plan: dict) -> None:
    for partition in plan["partitions"]:
        with psycopg.connect(dsn, autocommit=True) as source:
            copy_partition(source, conn, settings, run_id, partition)


def _first_load_copied(dsn: str, conn: psycopg.Connection, settings: Settings, backup_dir) -> dict:
    """Plan and copy run-1 as a first load (its link keys deferred); returns the schema as created."""
    ensure_audit_schema(conn)
    apply_schema(conn, "schema-only")
    as_created = _schema(conn)
    _copy_all(dsn, conn, settings, "run-1", _plan(conn, settings, "run-1", backup_dir))
    return as_created


def _assert_kept_then_loaded(
    dsn: str, conn: psycopg.Connection, settings: Settings, plan: dict, kept: str, schema_before: dict
) -> None:
    """The plan deferred every key but ``kept``, which stayed valid; the load then ends with ``schema_before``."""
    assert set(plan["deferred_keys"]) == KEYS - {kept}
    assert _link_keys(conn) == {kept: True}
    _copy_all(dsn, conn, settings, "run-1", plan)
    finalize_target(conn, conn, settings, "run-1")
    assert _schema(conn) == schema_before


def test_a_first_load_ends_with_the_keys_and_links_of_a_normal_load(legacy, make_db, backup_dir, monkeypatch):
    """Deferred, then added back: the same validated keys, indexes, triggers and rows as keys kept in place."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "schema-only")
        as_created = _schema(conn)
        assert set(_link_keys(conn)) == KEYS

        plan = _plan(conn, settings, "run-1", backup_dir)
        assert set(plan["deferred_keys"]) == KEYS
        assert _link_keys(conn) == {}
        recorded = conn.execute("SELECT constraint_name FROM migration_audit.deferred_keys").fetchall()
        assert {name for (name,) in recorded} == KEYS
        _copy_all(legacy, conn, settings, "run-1", plan)
        assert _link_keys(conn) == {}  # the partitions wrote their links without the keys

        result = finalize_target(conn, conn, settings, "run-1")
        assert sorted(result["indexes"]["keys"]["restored"]) == sorted(KEYS)
        assert result["indexes"]["keys"]["quarantined"] == {}
        assert _link_keys(conn) == dict.fromkeys(KEYS, True)
        assert _schema(conn) == as_created
        assert conn.execute("SELECT count(*) FROM migration_audit.deferred_keys").fetchone()[0] == 0
        assert _links(legacy) == {
            "groups": fx.MIGRATED_GROUP_LINKS,
            "permissions": fx.MIGRATED_PERMISSION_LINKS,
        }
        deferred_load = _links(legacy)

        # Enforced again, deferred (at commit), and a user's deletion takes its links.
        for statement in (
            "INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (999999, 1)",
            "INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (1, 999999)",
            "INSERT INTO account_newuser_user_permissions (newuser_id, permission_id) VALUES (1, 999999)",
        ):
            with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
                conn.execute(statement)
        # A later pass finds users in the target: it defers nothing and copies with the keys in place.
        plan2 = _plan(conn, settings, "run-2", backup_dir)
        assert plan2["deferred_keys"] == []
        assert _link_keys(conn) == dict.fromkeys(KEYS, True)
        conn.execute("UPDATE account_user_groups SET group_id = 2 WHERE id = 104")
        _copy_all(legacy, conn, settings, "run-2", plan2)
        assert _link_keys(conn) == dict.fromkeys(KEYS, True)
        finalize_target(conn, conn, settings, "run-2")
        assert _schema(conn) == as_created

    # The same load with the keys kept in place throughout (the path before deferred keys).
    normal = make_db("normal")
    fx.load(normal)
    monkeypatch.setattr(deferred_keys, "defer", lambda *args, **kwargs: [])
    run_stages(normal, normal, settings, "run-1", backup_dir / "normal")
    with psycopg.connect(normal) as conn:
        assert _link_keys(conn) == dict.fromkeys(KEYS, True)
        assert _schema(conn) == as_created
        assert _links(normal) == deferred_load


def test_links_whose_user_left_during_the_load_are_quarantined_with_the_reason(legacy, backup_dir):
    """A user that leaves the target while the key is away leaves links behind: recorded, then removed."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        plan = _plan(conn, settings, "run-1", backup_dir)
        _copy_all(legacy, conn, settings, "run-1", plan)
        # As a displaced holder or a vanished user leaves: ON DELETE CASCADE is not there to follow.
        conn.execute("DELETE FROM account_newuser WHERE id = 27")
        assert (
            conn.execute("SELECT count(*) FROM account_newuser_groups WHERE newuser_id = 27").fetchone()[0]
            == 2
        )

        result = finalize_target(conn, conn, settings, "run-1")
        assert result["indexes"]["keys"]["quarantined"] == {
            "account_newuser_groups_newuser_id_fkey": 2,
            "account_newuser_user_permissions_newuser_id_fkey": 1,
        }
        quarantined = conn.execute(
            "SELECT run_id, link_table, link_id, newuser_id, other_id, reason, detail "
            "FROM migration_audit.quarantined_links ORDER BY link_table, link_id"
        ).fetchall()
        assert [row[:6] for row in quarantined] == [
            ("run-1", "account_newuser_groups", 101, 27, 1, "user_missing"),
            ("run-1", "account_newuser_groups", 102, 27, 2, "user_missing"),
            ("run-1", "account_newuser_user_permissions", 201, 27, 1, "user_missing"),
        ]
        assert all("ON DELETE CASCADE" in row[6] for row in quarantined)
        assert _links(legacy) == {"groups": [(104, 1, 3)], "permissions": [(203, 40, 3)]}
        assert _link_keys(conn) == dict.fromkeys(KEYS, True)


def test_a_link_to_a_missing_group_is_refused_by_name_and_the_retry_completes(legacy, backup_dir):
    """A group deleted during the load: the finalize names the link and the fix; after it, a retry ends the job."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        as_created = _first_load_copied(legacy, conn, settings, backup_dir)
        # The application deletes group 3 and its legacy links; the target's link 104 is left behind.
        with conn.transaction():
            conn.execute("DELETE FROM account_user_groups WHERE group_id = 3")
            conn.execute("DELETE FROM auth_group WHERE id = 3")

        with pytest.raises(MigrationError) as refused:
            finalize_target(conn, conn, settings, "run-1")
        message = str(refused.value)
        assert "1 row(s) of account_newuser_groups reference a auth_group row that does not exist" in message
        assert "link 104 (user 1, group_id 3)" in message
        assert "Create the missing auth_group rows, or delete those links" in message
        # Nothing dropped: the link is still there, its key NOT VALID (new writes checked) and recorded.
        assert (104, 1, 3) in _links(legacy)["groups"]
        assert _link_keys(conn)["account_newuser_groups_group_id_fk"] is False
        assert conn.execute("SELECT constraint_name FROM migration_audit.deferred_keys").fetchall() == [
            ("account_newuser_groups_group_id_fk",)
        ]
        assert conn.execute("SELECT count(*) FROM migration_audit.quarantined_links").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
            conn.execute("INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (2, 3)")

        # The fix the message gives, then the retry completes: keys validated, indexes built.
        conn.execute("DELETE FROM account_newuser_groups WHERE id = 104")
        result = finalize_target(conn, conn, settings, "run-1")
        assert result["indexes"]["keys"]["restored"] == ["account_newuser_groups_group_id_fk"]
        assert _schema(conn) == as_created
        assert conn.execute("SELECT count(*) FROM migration_audit.deferred_keys").fetchone()[0] == 0


def test_a_finalize_cut_off_after_adding_a_key_not_valid_is_completed_by_the_next(legacy, backup_dir):
    """The state between the two steps (key added NOT VALID, record kept) is one the next try finishes."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        as_created = _first_load_copied(legacy, conn, settings, backup_dir)
        for name in sorted(KEYS)[:2]:
            conn.execute(deferred_keys.LINK_KEYS[name].add_statement())  # step 1 only, as a cut-off try
        result = finalize_target(conn, conn, settings, "run-1")
        assert sorted(result["indexes"]["keys"]["restored"]) == sorted(KEYS)
        assert _schema(conn) == as_created


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (
            "UPDATE migration_audit.deferred_keys SET definition = definition || '; DROP TABLE canary' "
            "WHERE constraint_name = 'account_newuser_groups_group_id_fk'",
            "set its definition back to: FOREIGN KEY (group_id) REFERENCES auth_group(id)",
        ),
        (
            "INSERT INTO migration_audit.deferred_keys (constraint_name, table_name, definition, run_id) VALUES "
            "('zz_key', 'account_newuser_groups', 'FOREIGN KEY (id) REFERENCES canary(id)', 'run-1')",
            "that is not one of the link tables' keys the migration defers",
        ),
    ],
)
def test_a_tampered_deferred_key_record_is_refused_and_nothing_runs(legacy, backup_dir, tamper, says):
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        plan = _plan(conn, settings, "run-1", backup_dir)
        assert set(plan["deferred_keys"]) == KEYS
        conn.execute("CREATE TABLE canary (id int PRIMARY KEY)")
        conn.execute(tamper)
        with pytest.raises(MigrationError) as refused:
            finalize_target(conn, conn, settings, "run-1")
        assert says in str(refused.value)
        assert conn.execute("SELECT to_regclass('canary') IS NOT NULL").fetchone()[0]
        assert _link_keys(conn) == {}  # not one key was added


def test_a_busy_auth_group_keeps_its_key_through_the_first_load(legacy, backup_dir):
    """Dropping a key to auth_group needs its ACCESS EXCLUSIVE lock: never queued behind the application."""
    settings = Settings(partitions=2, batch_size=5, lock_timeout_ms=200)
    with (
        psycopg.connect(legacy, autocommit=True) as conn,
        psycopg.connect(legacy, autocommit=True) as application,
    ):
        ensure_audit_schema(conn)
        apply_schema(conn, "schema-only")
        as_created = _schema(conn)
        with application.transaction():
            application.execute("SELECT count(*) FROM auth_group")  # an open transaction that read it
            plan = _plan(conn, settings, "run-1", backup_dir)
        _assert_kept_then_loaded(
            legacy, conn, settings, plan, "account_newuser_groups_group_id_fk", as_created
        )


def test_a_key_that_differs_from_the_ddl_stays_in_place(legacy, backup_dir):
    """A key changed by hand is never deferred: it could only come back as the DDL's, not as it was."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "schema-only")
        conn.execute(
            "ALTER TABLE account_newuser_groups DROP CONSTRAINT account_newuser_groups_newuser_id_fkey, "
            "ADD CONSTRAINT account_newuser_groups_newuser_id_fkey FOREIGN KEY (newuser_id) "
            "REFERENCES account_newuser (id) ON DELETE CASCADE"  # not deferrable
        )
        as_changed = _schema(conn)
        plan = _plan(conn, settings, "run-1", backup_dir)
        _assert_kept_then_loaded(
            legacy, conn, settings, plan, "account_newuser_groups_newuser_id_fkey", as_changed
        )


def test_readers_of_auth_group_never_queue_long_behind_the_dropping_of_its_key(legacy, backup_dir):
    """While a DROP CONSTRAINT waits for auth_group's ACCESS EXCLUSIVE lock, every reader of
    auth_group queues behind it: each try waits at most DROP_LOCK_MS and commits at once, so a reader
    waits about that long, not lock_timeout_ms or until the plan commits (the review's finding)."""
    settings = Settings(partitions=2, batch_size=5, lock_timeout_ms=3000)
    waits: list[float] = []
    stop = threading.Event()

    def read_auth_group() -> None:
        with psycopg.connect(legacy, autocommit=True) as reader:
            while not stop.is_set():
                started = time.monotonic()
                reader.execute("SELECT count(*) FROM auth_group")
                waits.append(time.monotonic() - started)
                time.sleep(0.02)

    with (
        psycopg.connect(legacy, autocommit=True) as conn,
        psycopg.connect(legacy, autocommit=True) as application,
    ):
        ensure_audit_schema(conn)
        apply_schema(conn, "schema-only")
        as_created = _schema(conn)
        application.execute("BEGIN")
        application.execute("SELECT count(*) FROM auth_group")  # an open transaction that read it
        ends = threading.Timer(2.0, application.execute, ("COMMIT",))
        reader = threading.Thread(target=read_auth_group)
        ends.start()
        reader.start()
        try:
            plan = _plan(conn, settings, "run-1", backup_dir)
        finally:
            ends.join()
            stop.set()
            reader.join()
        assert max(waits) < 1.0, f"a reader of auth_group waited {max(waits):.2f} s"
        assert len(waits) > 20
        assert KEYS - {"account_newuser_groups_group_id_fk"} <= set(plan["deferred_keys"])
        _copy_all(legacy, conn, settings, "run-1", plan)
        finalize_target(conn, conn, settings, "run-1")
        assert _schema(conn) == as_created
