"""Sync passes against a database being written to, the cutover, the lease, rollback and restore."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import run_stages
from support.sync import SETTINGS, cutover, expected_target, migrated, start_writer, validated_pass

from user_migration import lease, rollback
from user_migration.backup import run_backup
from user_migration.cutover import CutoverOptions, CutoverRefused, active_cutover, run_cutover
from user_migration.errors import MigrationError
from user_migration.rollback import carry_back, restore


@pytest.fixture
def legacy(make_db) -> str:
    dsn = make_db("cut")
    fx.load(dsn)
    return dsn


def test_passes_converge_while_the_application_writes_then_cutover_freezes_it(legacy, backup_dir, tmp_path):
    finish = start_writer(legacy, tmp_path)
    time.sleep(0.5)
    validated_pass(legacy, "pass-1", backup_dir)
    validated_pass(legacy, "pass-2", backup_dir)
    time.sleep(0.3)
    validated_pass(legacy, "pass-3", backup_dir)
    result = cutover(legacy, "pass-3")  # the writer is still writing
    time.sleep(0.5)
    stats = finish()

    assert stats["inserted"] > 5 and stats["updated"] > 5 and stats["deleted"] > 0, stats
    # After the cutover every write fails, naming the new table.
    assert stats["errors"], "the writer's writes must fail after the cutover"
    assert all("read-only: users moved to account_newuser" in e for e in stats["errors"]), stats["errors"]
    # The target equals the transform of the final legacy state, row by row.
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    assert result["source_checksum"] == result["target_checksum"]
    assert result["write_pause_seconds"] < 10
    with psycopg.connect(legacy) as conn:
        cut = conn.execute(
            "SELECT run_id, state, source_rows, target_rows + rejected_rows FROM migration_audit.cutovers"
        ).fetchone()
        assert cut[:2] == ("pass-3", "active") and cut[2] == cut[3]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="account_newuser"):
            conn.execute("UPDATE account_user SET full_name = 'x' WHERE id = 1")


def test_cutover_dry_run_changes_nothing_and_reports_the_pause(legacy, backup_dir):
    validated_pass(legacy, "pass-1", backup_dir)
    before = migrated(legacy)
    result = cutover(legacy, "pass-1", dry_run=True)
    assert result["dry_run"] is True and result["write_pause_seconds"] >= 0
    assert result["source_checksum"] == result["target_checksum"]
    with psycopg.connect(legacy) as conn:
        assert active_cutover(conn) is None
        conn.execute("UPDATE account_user SET full_name = 'Still Writable' WHERE id = 1")
    assert migrated(legacy) == before


def test_cutover_refused_without_a_passing_validation(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "unvalidated", backup_dir)
    with pytest.raises(CutoverRefused, match="validation of run 'unvalidated' did not pass"):
        cutover(legacy, "unvalidated")


def test_cutover_gives_up_within_its_timeout_when_a_long_transaction_holds_the_table(legacy, backup_dir):
    validated_pass(legacy, "pass-1", backup_dir)
    blocker = psycopg.connect(legacy, application_name="long-report")
    blocker.execute("UPDATE account_user SET full_name = full_name WHERE id = 1")  # open transaction
    started = time.monotonic()
    try:
        with pytest.raises(CutoverRefused) as refused:
            cutover(legacy, "pass-1", lock_timeout_ms=200, attempts=3, backoff_seconds=0.1)
        elapsed = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    message = str(refused.value)
    assert "could not be locked within 200 ms in 3 attempts" in message and "long-report" in message
    assert elapsed < 0.2 * 3 + 0.1 + 0.2 + 2  # three timeouts and two backoffs, plus slack
    with psycopg.connect(legacy) as conn:
        assert active_cutover(conn) is None
        conn.execute("UPDATE account_user SET full_name = 'Writable' WHERE id = 1")


SIGNUP = (
    "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, phone_number, "
    "is_active, is_staff) VALUES ('pbkdf2_sha256$1$s$h=', false, 'deadlock@example.com', 'deadlock', "
    "'Dead Lock', '1990-01-01', '9841234567', true, false) RETURNING id",
    "INSERT INTO account_user_groups (user_id, group_id) SELECT %(id)s, min(id) FROM auth_group",
)
# Django's delete: the user's links, then the user, in one transaction.
DELETE = (
    "DELETE FROM account_user_groups WHERE user_id = %(id)s",
    "DELETE FROM account_user WHERE id = %(id)s",
)


@pytest.mark.parametrize(
    "statements, waits_on, attempts",
    [(SIGNUP, "account_user", 2), (DELETE, "account_user_groups", 1)],
    ids=["signup-deadlocks-and-retries", "django-delete-never-deadlocks"],
)
def test_an_application_transaction_across_legacy_tables_costs_at_most_an_attempt(
    legacy, backup_dir, statements, waits_on, attempts
):
    """An application transaction writes one legacy table; the cutover starts locking and waits for
    it; then the transaction writes another table. The cutover locks the links before the users, as
    Django deletes them, so a delete just finishes first. A sign-up (user, then link) deadlocks:
    PostgreSQL aborts the side that waited first (the cutover's attempt), the application's
    transaction commits, and the next attempt cuts over with its change carried."""
    validated_pass(legacy, "pass-1", backup_dir)
    app = psycopg.connect(legacy, application_name="application")
    # The cutover, not the application, must be the one that detects the deadlock (as it is when it
    # waited first), however long the loaded machine takes between the two waits.
    app.execute("SET deadlock_timeout = '60s'")
    app.commit()
    first = app.execute(statements[0], {"id": 1})  # user 1 has a group link
    user_id = first.fetchone()[0] if first.description else 1
    outcome: dict = {}

    def cut() -> None:
        try:
            outcome["result"] = cutover(legacy, "pass-1", backoff_seconds=0.1)
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=cut)
    thread.start()
    try:
        with psycopg.connect(legacy, autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while not watcher.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = %s::regclass "
                "AND mode = 'ExclusiveLock')",
                (waits_on,),
            ).fetchone()[0]:
                assert time.monotonic() < deadline and thread.is_alive(), outcome
                time.sleep(0.02)
        app.execute(statements[1], {"id": user_id})
        app.commit()
    finally:
        app.close()
        thread.join(120)
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert result["lock_attempts"] == attempts
    assert result["source_checksum"] == result["target_checksum"]
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    with psycopg.connect(legacy) as conn:
        links = conn.execute(
            "SELECT count(*) FROM account_newuser_groups WHERE newuser_id = %s", (user_id,)
        ).fetchone()[0]
    assert links == (1 if statements is SIGNUP else 0)


def test_pause_while_cutover_holds_the_lock_then_writes_fail(legacy, backup_dir):
    """A write that arrives during the cutover waits for it instead of failing at once."""
    validated_pass(legacy, "pass-1", backup_dir)
    outcome = {}

    def write_during_cutover():
        time.sleep(0.05)
        with psycopg.connect(legacy, autocommit=True) as conn:
            started = time.monotonic()
            try:
                conn.execute("UPDATE account_user SET full_name = 'During' WHERE id = 2")
                outcome["result"] = "written"
            except psycopg.errors.ReadOnlySqlTransaction:
                outcome["result"] = "read-only"
            outcome["waited"] = time.monotonic() - started

    thread = threading.Thread(target=write_during_cutover)
    thread.start()
    cutover(legacy, "pass-1")
    thread.join(30)
    assert outcome["result"] in ("read-only", "written")
    if outcome["result"] == "written":  # it got in before the lock: then the final sync carried it
        assert migrated(legacy)[2][6] == "During"


def test_later_passes_see_the_cutover(legacy, backup_dir):
    validated_pass(legacy, "pass-1", backup_dir)
    cutover(legacy, "pass-1")
    with psycopg.connect(legacy) as conn:
        assert active_cutover(conn)["run_id"] == "pass-1"
    with pytest.raises(CutoverRefused, match="already cut over by run 'pass-1'"):
        validated_pass(legacy, "pass-2", backup_dir)  # the backup still reads; the pass would write
        cutover(legacy, "pass-2")


@pytest.mark.parametrize("batch", [1, 10_000])  # the changed rows are read a batch at a time
def test_rollback_carries_back_every_change_made_after_the_cutover(legacy, backup_dir, batch, monkeypatch):
    monkeypatch.setattr(rollback, "BATCH", batch)
    validated_pass(legacy, "pass-1", backup_dir)
    cutover(legacy, "pass-1")
    login = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
    with psycopg.connect(legacy) as conn:  # the application, now on the new table
        conn.execute(
            "INSERT INTO account_newuser (id, password, last_login, is_superuser, email, username, full_name, "
            "date_of_birth, phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
            "(1000, 'pbkdf2_sha256$600000$new$user=', NULL, false, 'newbie@example.com', 'newbie', 'New Bie', "
            "'2001-02-03', '+9779841000000', true, false, now(), now())"
        )
        conn.execute("UPDATE account_newuser SET password = 'pbkdf2_sha256$changed' WHERE id = 1")
        conn.execute("UPDATE account_newuser SET last_login = %s WHERE id = 2", (login,))
        conn.execute("UPDATE account_newuser SET is_active = false, is_staff = true WHERE id = 10")
        conn.execute("DELETE FROM account_newuser WHERE id = 27")
        # Links: user 1 leaves "editors" (link 104) and joins "customers"; the new user joins
        # "support"; user 2 gains a permission under an id the legacy table uses for rejected user 28 (202).
        conn.execute("DELETE FROM account_newuser_groups WHERE id = 104")
        conn.execute("INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (1, 1), (1000, 2)")
        conn.execute(
            "INSERT INTO account_newuser_user_permissions (id, newuser_id, permission_id) VALUES (202, 2, 3)"
        )
    with psycopg.connect(legacy, autocommit=True) as conn:
        result = carry_back(conn, conn, SETTINGS, "test", "rollback-1")
    assert (result["inserted"], result["updated"], result["deleted"]) == (1, 3, 1)
    assert (result["links_added"], result["links_removed"]) == (3, 1)
    with psycopg.connect(legacy) as conn:
        rows = {
            r[0]: r
            for r in conn.execute(
                "SELECT id, password, last_login, is_active, is_staff, email, username, phone_number FROM account_user"
            ).fetchall()
        }
        assert rows[1000][1:] == (
            "pbkdf2_sha256$600000$new$user=",
            None,
            True,
            False,
            "newbie@example.com",
            "newbie",
            "+9779841000000",
        )
        assert rows[1][1] == "pbkdf2_sha256$changed"
        assert rows[2][2] == login
        assert rows[10][3:5] == (False, True)
        assert 27 not in rows
        # Only changed fields were written back: row 2's padded email stays as the legacy had it.
        assert rows[2][5] == "  bob@gmail.com "
        assert conn.execute(
            "SELECT action, count(*) FROM migration_audit.rollback_rows GROUP BY action ORDER BY action"
        ).fetchall() == [
            ("delete", 1),
            ("insert", 1),
            ("links:account_user_groups", 2),
            ("links:account_user_user_permissions", 1),
            ("update", 3),
        ]
        assert conn.execute(
            "SELECT source_id, detail FROM migration_audit.rollback_rows WHERE action LIKE 'links:%' "
            "ORDER BY action, source_id"
        ).fetchall() == [(1, "+1 -1"), (1000, "+1 -0"), (2, "+1 -0")]
        # User 28 was rejected, so only the legacy side has it: its links (103, 202) stay as they were.
        assert conn.execute("SELECT user_id, group_id FROM account_user_groups ORDER BY 1, 2").fetchall() == [
            (1, 1),
            (28, 1),
            (1000, 2),
        ]
        permissions = conn.execute(
            "SELECT id, user_id, permission_id FROM account_user_user_permissions ORDER BY id"
        )
        permissions = permissions.fetchall()
        assert [p[1:] for p in permissions] == [(28, 2), (40, 3), (2, 3)]
        assert permissions[2][0] > 203  # 202 was taken on the legacy side: a new id
        conn.execute("INSERT INTO account_user_user_permissions (user_id, permission_id) VALUES (40, 1)")
        assert active_cutover(conn) is None
        conn.execute("UPDATE account_user SET full_name = 'Writable Again' WHERE id = 11")
        conn.commit()
    # Passes resume and bring the target in line with the legacy table again.
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    with psycopg.connect(legacy) as conn:
        for legacy_links, target_links, user, other in (
            ("account_user_groups", "account_newuser_groups", "user_id", "group_id"),
            ("account_user_user_permissions", "account_newuser_user_permissions", "user_id", "permission_id"),
        ):
            expected = conn.execute(
                f"SELECT id, {user}, {other} FROM {legacy_links} WHERE {user} IN (SELECT id FROM account_newuser) "
                "ORDER BY id"
            ).fetchall()
            assert (
                conn.execute(f"SELECT id, newuser_id, {other} FROM {target_links} ORDER BY id").fetchall()
                == expected
            )


def test_restore_reproduces_the_legacy_tables_and_refuses_a_tampered_backup(legacy, backup_dir):
    tables = ("account_user", "account_user_groups", "account_user_user_permissions")

    def dump() -> dict:
        with psycopg.connect(legacy) as conn:
            return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables}

    original = dump()
    with psycopg.connect(legacy, autocommit=True) as conn:
        folder = Path(run_backup(conn, SETTINGS.mapping, backup_dir, "backup-run").folder)
        conn.execute("DELETE FROM account_user_groups WHERE user_id = 27")
        conn.execute("UPDATE account_user SET email = 'changed@example.com' WHERE id = 1")
        conn.execute(
            "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES ('x', false, 'late@example.com', 'late', 'Late', "
            "'1990-01-01', '', true, false)"
        )
        assert dump() != original
        result = restore(conn, conn, SETTINGS, folder)
    assert result["restored"]["public.account_user"] == len(fx.ROWS)
    assert dump() == original
    with psycopg.connect(legacy) as conn:  # the sequence is past the restored ids
        new_id = conn.execute(
            "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES ('x', false, 'next@example.com', 'next', 'Next', "
            "'1990-01-01', '', true, false) RETURNING id"
        ).fetchone()[0]
        assert new_id > max(r[0] for r in original["account_user"])
        conn.rollback()

    path = folder / "account_user.csv.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with (
        psycopg.connect(legacy, autocommit=True) as conn,
        pytest.raises(MigrationError, match=r"account_user\.csv\.gz does not match its manifest"),
    ):
        restore(conn, conn, SETTINGS, folder)
    assert dump() == original


def test_writer_lease_keeps_two_runs_apart(legacy):
    with (
        psycopg.connect(legacy, autocommit=True) as first,
        psycopg.connect(legacy, autocommit=True) as second,
    ):
        from user_migration.db import ensure_audit_schema

        ensure_audit_schema(first)
        lease.acquire(first, "run-a", "user_migration", wait_seconds=1, stale_minutes=30)
        lease.acquire(first, "run-a", "user_migration", wait_seconds=1, stale_minutes=30)  # re-entrant
        started = time.monotonic()
        with pytest.raises(MigrationError, match="being written by run 'run-a' of DAG 'user_migration'"):
            lease.acquire(second, "run-b", "user_migration", wait_seconds=1.5, stale_minutes=30)
        assert 1.4 < time.monotonic() - started < 5
        with pytest.raises(MigrationError, match="does not hold the writer lease"), second.transaction():
            lease.hold(second, "run-b")
        lease.release(first, "run-a")
        lease.acquire(second, "run-b", "user_migration", wait_seconds=1, stale_minutes=30)
        # A live holder (its session holds the lease's advisory lock) is not taken over, however long ago
        # it renewed; see tests/test_lease.py.
        second.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '2 hours'")
        with pytest.raises(lease.LeaseBusy, match="Its tasks are running now"):
            lease.acquire(first, "run-c", "user_migration", wait_seconds=0, stale_minutes=30)
        # A holder running older code (it takes no advisory lock) is taken over once stale.
        lease.release(second, "run-b")
        second.execute(
            "UPDATE migration_audit.writer_lease SET run_id = 'run-old', lock_run_id = NULL, "
            "renewed_at = now() - interval '2 hours'"
        )
        lease.acquire(first, "run-c", "user_migration", wait_seconds=1, stale_minutes=30)
        assert first.execute("SELECT run_id FROM migration_audit.writer_lease").fetchone()[0] == "run-c"


def test_rollback_into_a_separate_legacy_database_refuses_a_link_to_a_missing_group(make_db, backup_dir):
    """Target and legacy on different databases: the changes cross between two connections, and a link
    the legacy side cannot hold (its group does not exist there) stops the rollback with nothing changed."""
    legacy_db, target_db = make_db("src"), make_db("dst")
    fx.load(legacy_db)
    result = run_stages(legacy_db, target_db, SETTINGS, "sep-1", backup_dir)
    with psycopg.connect(target_db) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) "
            "VALUES ('sep-1', 'every_source_row_accounted', %s)",
            (result["migrated"] + result["rejected"] == result["source_rows"],),
        )
    with (
        psycopg.connect(legacy_db, autocommit=True) as src,
        psycopg.connect(target_db, autocommit=True) as dst,
    ):
        run_cutover(src, dst, SETTINGS, "sep-1", dt.date.today(), "test", CutoverOptions())
    with psycopg.connect(target_db) as conn:  # the application, on the new database
        conn.execute("UPDATE account_newuser SET full_name = 'Renamed' WHERE id = 1")
        conn.execute("INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (2, 1), (2, 99)")

    def legacy_state() -> tuple:
        with psycopg.connect(legacy_db) as conn:
            return (
                conn.execute("SELECT id, full_name FROM account_user ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM account_user_groups ORDER BY id").fetchall(),
            )

    before = legacy_state()
    with (
        psycopg.connect(legacy_db, autocommit=True) as src,
        psycopg.connect(target_db, autocommit=True) as dst,
    ):
        with pytest.raises(
            MigrationError, match=r"rollback stopped, nothing changed: a link in account_newuser_groups"
        ):
            carry_back(src, dst, SETTINGS, "test", "rollback-sep")
        assert active_cutover(dst) is not None
    assert legacy_state() == before

    with psycopg.connect(target_db) as conn:
        conn.execute("DELETE FROM account_newuser_groups WHERE group_id = 99")
    with (
        psycopg.connect(legacy_db, autocommit=True) as src,
        psycopg.connect(target_db, autocommit=True) as dst,
    ):
        result = carry_back(src, dst, SETTINGS, "test", "rollback-sep")
    assert (result["updated"], result["links_added"], result["links_removed"]) == (1, 1, 0)
    users, groups = legacy_state()
    assert dict(users)[1] == "Renamed"
    assert sorted(g[1:] for g in groups) == sorted([*(g[1:] for g in fx.GROUP_LINKS), (2, 1)])


def test_rollback_that_breaks_a_legacy_unique_key_stops_with_nothing_changed(legacy, backup_dir):
    """After the cutover user 1 takes the username that user 28 (rejected, so only on the legacy side)
    still holds there: the rollback names the key and the user, not the value, and changes nothing."""
    validated_pass(legacy, "pass-1", backup_dir)
    cutover(legacy, "pass-1")
    with psycopg.connect(legacy) as conn:
        taken = conn.execute("SELECT username FROM account_user WHERE id = 28").fetchone()[0]
        conn.execute("UPDATE account_newuser SET username = %s, full_name = 'Changed' WHERE id = 1", (taken,))
        conn.execute("UPDATE account_newuser SET full_name = 'Also Changed' WHERE id = 2")
        before = conn.execute("SELECT * FROM account_user ORDER BY id").fetchall()
    with psycopg.connect(legacy, autocommit=True) as conn:
        with pytest.raises(MigrationError) as raised:
            carry_back(conn, conn, SETTINGS, "test", "rollback-1")
        message = str(raised.value)
        assert "rollback stopped, nothing changed" in message and "account_user_username_key" in message
        assert "users 1" in message and taken not in message
        assert active_cutover(conn) is not None
        assert conn.execute("SELECT * FROM account_user ORDER BY id").fetchall() == before
        assert conn.execute("SELECT count(*) FROM migration_audit.rollback_rows").fetchone() == (0,)


def test_a_deleted_reject_above_every_legacy_id_does_not_block_the_cutover(legacy, backup_dir):
    """The sync state of a reject that left the legacy table is cleaned, wherever its id lies."""
    top = max(row[0] for row in fx.ROWS)
    validated_pass(legacy, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:
        conn.execute("UPDATE account_user SET email = 'not-an-email' WHERE id = %s", (top,))
    validated_pass(legacy, "pass-2", backup_dir)
    with psycopg.connect(legacy) as conn:
        state = "SELECT outcome FROM migration_audit.source_state WHERE source_id = %s"
        assert conn.execute(state, (top,)).fetchone() == ("R",)
        conn.execute("DELETE FROM account_user_user_permissions WHERE user_id = %s", (top,))
        conn.execute("DELETE FROM account_user_groups WHERE user_id = %s", (top,))
        conn.execute("DELETE FROM account_user WHERE id = %s", (top,))
    validated_pass(legacy, "pass-3", backup_dir)
    with psycopg.connect(legacy) as conn:
        assert conn.execute(state, (top,)).fetchone() is None

    result = cutover(legacy, "pass-3")
    assert result["source_rows"] == len(fx.ROWS) - 1
    assert result["source_checksum"] == result["target_checksum"]
    with psycopg.connect(legacy) as conn:
        assert conn.execute(state, (top,)).fetchone() is None
        assert active_cutover(conn)["run_id"] == "pass-3"
