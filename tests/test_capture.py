"""Change capture: passes read the change log, the cutover works from it, and a gap is caught."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import psycopg
import pytest
import seed_legacy
from support import fixture_users as fx
from support.pipeline import run_stages, snapshot
from support.sync import SETTINGS, cutover, expected_target, migrated, start_writer, validated_pass

from user_migration import cutover as cutover_module
from user_migration.config import Settings
from user_migration.cutover import (
    CutoverOptions,
    CutoverRefused,
    active_cutover,
    resolve_pending,
    run_cutover,
)
from user_migration.rollback import carry_back


def plan_mode(dsn: str, run_id: str) -> tuple[str, str]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT changes, changes_reason FROM migration_audit.plans WHERE run_id = %s", (run_id,)
        ).fetchone()


def log_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT seq, source, source_id, op FROM user_migration_changes ORDER BY seq"
        ).fetchall()


def application_writes(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE account_user SET full_name = 'Changed Name' WHERE id = 1")
        conn.execute("UPDATE account_user SET email = 'moved@example.org' WHERE id = 2")
        conn.execute(
            "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES ('pbkdf2_sha256$x', false, 'late@example.com', 'late', "
            "'Late Comer', '1991-01-01', '9841000001', true, false)"
        )
        conn.execute("DELETE FROM account_user_groups WHERE user_id = 27")
        conn.execute("DELETE FROM account_user_user_permissions WHERE user_id = 27")
        conn.execute("DELETE FROM account_user WHERE id = 27")
        conn.execute("INSERT INTO account_user_groups (user_id, group_id) VALUES (1, 2)")


def test_a_later_pass_reads_the_change_log_and_ends_exact(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    assert plan_mode(legacy, "pass-1")[0] == "full"  # capture was just installed
    assert log_rows(legacy) == []  # the full pass consumed what its snapshots saw
    application_writes(legacy)
    assert {row[2] for row in log_rows(legacy)} == {1, 2, 27, max(r[2] for r in log_rows(legacy))}
    result = run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert plan_mode(legacy, "pass-2") == ("log", "the change log is trusted")
    assert log_rows(legacy) == []
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    with psycopg.connect(legacy) as conn:
        paths = {
            r[0] for r in conn.execute("SELECT DISTINCT error FROM migration_audit.partitions").fetchall()
        }
        groups = conn.execute("SELECT group_id FROM account_newuser_groups WHERE newuser_id = 1").fetchall()
    assert paths == {None} and (2,) in groups
    assert (result["inserted"], result["removed"]) == (1, 1) and result["updated"] >= 2
    # The full comparison on demand finds nothing the log missed.
    again = run_stages(
        legacy, legacy, Settings(**{**SETTINGS.__dict__, "full_reconcile": True}), "pass-3", backup_dir
    )
    assert plan_mode(legacy, "pass-3") == ("full", "full_reconcile requested")
    assert (again["inserted"], again["updated"], again["removed"]) == (0, 0, 0)


def test_a_disabled_trigger_makes_the_next_pass_compare_every_row(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:  # a DBA disables capture, and a change goes unlogged
        conn.execute("ALTER TABLE account_user DISABLE TRIGGER user_migration_capture_update")
        conn.execute("UPDATE account_user SET full_name = 'Unlogged Change' WHERE id = 1")
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert plan_mode(legacy, "pass-2") == ("full", "a capture trigger was missing or disabled")
    assert migrated(legacy)[1][6] == "Unlogged Change"
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir)
    assert plan_mode(legacy, "pass-3")[0] == "log"  # re-armed by the full pass


def test_the_rehearsal_catches_a_change_the_log_missed(legacy, backup_dir):
    """A trigger disabled and enabled again between passes leaves no trace in the catalog; the
    rehearsal's full verification still finds the row, and a full_reconcile pass repairs it."""
    validated_pass(legacy, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:
        conn.execute("ALTER TABLE account_user DISABLE TRIGGER user_migration_capture_update")
        conn.execute("UPDATE account_user SET full_name = 'Slipped Through' WHERE id = 2")
        conn.execute("ALTER TABLE account_user ENABLE TRIGGER user_migration_capture_update")
    with pytest.raises(CutoverRefused, match="1 legacy rows differ from the sync state"):
        cutover(legacy, "pass-1", dry_run=True)
    run_stages(
        legacy, legacy, Settings(**{**SETTINGS.__dict__, "full_reconcile": True}), "pass-2", backup_dir
    )
    with psycopg.connect(legacy) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) VALUES ('pass-2', 'x', true)"
        )
    result = cutover(legacy, "pass-2", dry_run=True)
    assert result["full_verification"] is True and migrated(legacy)[2][6] == "Slipped Through"


def test_the_rehearsal_runs_the_final_sync_and_leaves_everything_as_it_was(legacy, backup_dir):
    validated_pass(legacy, "pass-1", backup_dir)
    application_writes(legacy)
    before = (snapshot(legacy), log_rows(legacy))
    with psycopg.connect(legacy) as conn:
        legacy_before = conn.execute("SELECT * FROM account_user ORDER BY id").fetchall()
    result = cutover(legacy, "pass-1", dry_run=True)
    assert result["dry_run"] is True and result["final_sync"]["users"] == 4
    assert result["final_sync"]["inserted"] == 1 and result["final_sync"]["removed"] == 1
    assert result["source_checksum"] == result["target_checksum"] and result["write_pause_seconds"] > 0
    assert (snapshot(legacy), log_rows(legacy)) == before
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT * FROM account_user ORDER BY id").fetchall() == legacy_before
        assert active_cutover(conn) is None
        conn.execute("UPDATE account_user SET full_name = 'Still Writable' WHERE id = 1")  # and captured
    assert log_rows(legacy)[-1][2:] == (1, "U")


def test_the_cutover_applies_the_last_changes_and_a_rollback_removes_the_capture(legacy, backup_dir):
    validated_pass(legacy, "pass-1", backup_dir)
    application_writes(legacy)
    result = cutover(legacy, "pass-1")
    assert result["final_sync"]["users"] == 4
    assert migrated(legacy) == expected_target(legacy, dt.date.today())

    def leftovers() -> tuple:
        with psycopg.connect(legacy) as conn:
            return (
                conn.execute("SELECT to_regclass('user_migration_changes') IS NOT NULL").fetchone()[0],
                conn.execute(
                    "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'user_migration_cutover%'"
                ).fetchone()[0],
                conn.execute(
                    "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'user_migration_capture%'"
                ).fetchone()[0],
            )

    assert leftovers() == (True, 0, 12)  # capture stays, behind the read-only triggers, and logs nothing
    with psycopg.connect(legacy) as conn:
        state, pause = conn.execute("SELECT state, pause_seconds FROM migration_audit.cutovers").fetchone()
        assert conn.execute("SELECT count(*) FROM user_migration_changes").fetchone() == (0,)
    assert state == "active" and pause == pytest.approx(result["write_pause_seconds"], abs=0.05)
    with psycopg.connect(legacy, autocommit=True) as conn:
        carry_back(conn, conn, SETTINGS, "test", "rollback-1")
    assert leftovers() == (False, 0, 0)


def test_a_dry_run_dag_run_rehearses_with_the_real_final_sync(legacy, backup_dir):
    """The rehearsal of a run whose Params say dry_run still applies the changes (then rolls back)."""
    validated_pass(legacy, "pass-1", backup_dir)
    application_writes(legacy)
    dry = Settings(**{**SETTINGS.__dict__, "dry_run": True})
    with psycopg.connect(legacy, autocommit=True) as conn:
        result = run_cutover(conn, conn, dry, "pass-1", dt.date.today(), "test", CutoverOptions(dry_run=True))
    assert result["final_sync"]["inserted"] == 1 and result["final_sync"]["removed"] == 1
    assert active_cutover(psycopg.connect(legacy)) is None


def test_a_failed_legacy_commit_leaves_no_split_brain(make_db, backup_dir, monkeypatch):
    """Two databases: the target commits the cutover, then the legacy connection dies before its commit."""
    legacy_db, target_db = make_db("src"), make_db("dst")
    fx.load(legacy_db)
    for run in ("sep-1",):
        run_stages(legacy_db, target_db, SETTINGS, run, backup_dir)
        with psycopg.connect(target_db) as conn:
            conn.execute(
                "INSERT INTO migration_audit.validation_results (run_id, expectation, success) VALUES (%s, 'x', true)",
                (run,),
            )
    application_writes(legacy_db)

    def connect():
        return psycopg.connect(legacy_db, autocommit=True), psycopg.connect(target_db, autocommit=True)

    src, dst = connect()
    with psycopg.connect(legacy_db, autocommit=True) as killer:
        monkeypatch.setattr(
            cutover_module,
            "_between_commits",
            lambda: killer.execute("SELECT pg_terminate_backend(%s)", (src.info.backend_pid,)),
        )
        with pytest.raises(psycopg.OperationalError):
            run_cutover(src, dst, SETTINGS, "sep-1", dt.date.today(), "test", CutoverOptions())
    monkeypatch.undo()
    assert dst.execute("SELECT state FROM migration_audit.cutovers").fetchall() == [("switching",)]
    src.close()
    src = psycopg.connect(legacy_db, autocommit=True)
    src.execute("UPDATE account_user SET full_name = 'Written After' WHERE id = 5")  # still writable
    assert resolve_pending(src, dst, SETTINGS) == "abandoned"
    assert active_cutover(dst) is None
    result = run_cutover(src, dst, SETTINGS, "sep-1", dt.date.today(), "test", CutoverOptions())
    assert result["final_sync"]["users"] == 5  # the four of the failed attempt, applied again, and user 5
    assert dst.execute("SELECT state FROM migration_audit.cutovers ORDER BY id").fetchall() == [
        ("abandoned",),
        ("active",),
    ]
    assert migrated(target_db) == expected_target(legacy_db, dt.date.today())
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        src.execute("UPDATE account_user SET full_name = 'x' WHERE id = 1")
    src.close()
    dst.close()


def test_the_write_pause_does_not_grow_with_the_table(make_db, backup_dir, tmp_path):
    """200,000 users and an application writing throughout: the cutover's pause is a small share of
    what the old cutover did under the lock (a full pass), and no write waits longer than the pause."""
    dsn = make_db("big")
    seed_legacy.seed(dsn, users=200_000)
    settings = Settings(partitions=2, batch_size=10_000)
    run_stages(dsn, dsn, settings, "first", backup_dir)
    started = time.monotonic()
    run_stages(dsn, dsn, Settings(**{**settings.__dict__, "full_reconcile": True}), "full", backup_dir)
    full_pass = time.monotonic() - started
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) VALUES ('full', 'x', true)"
        )
    finish = start_writer(dsn, tmp_path)
    time.sleep(1.0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        result = run_cutover(conn, conn, settings, "full", dt.date.today(), "test", CutoverOptions())
    time.sleep(0.3)
    stats = finish()
    assert stats["updated"] + stats["inserted"] > 10 and stats["errors"], stats
    pause = result["write_pause_seconds"]
    print(
        f"full pass {full_pass:.2f} s; cutover pause {pause:.3f} s; longest write {stats['max_seconds']:.3f} s"
    )
    assert pause < full_pass / 5, (pause, full_pass)
    assert stats["max_seconds"] < full_pass / 5, (stats["max_seconds"], full_pass)
    assert result["source_checksum"] == result["target_checksum"]


def test_a_pass_after_nothing_changed_is_covered_by_the_last_backup(legacy, backup_dir):
    """Issue 13: an hourly pass with nothing to do need not write another full backup."""
    from user_migration import audit
    from user_migration.backup import backup_covering

    def finished_pass(run_id: str) -> None:
        run_stages(legacy, legacy, SETTINGS, run_id, backup_dir)
        with psycopg.connect(legacy, autocommit=True) as conn:
            audit.finish_run(conn, run_id, "success", {})

    def covering(run_id: str) -> str | None:
        with psycopg.connect(legacy, autocommit=True) as conn:
            return backup_covering(conn, conn, SETTINGS, run_id)

    finished_pass("pass-1")  # the first load: it changed everything
    assert covering("pass-2") is None
    finished_pass("pass-2")  # nothing changed: the log was empty, its partitions consumed nothing
    note = covering("pass-3")
    assert note is not None and "run 'pass-2'" in note and "pass-2" in note.split(": ", 1)[1]
    with psycopg.connect(legacy) as conn:  # the application writes: the log is no longer empty
        # User 4 is rejected (invalid email): the pass changes nothing in the target for it, yet the
        # legacy table changed, so only the consumed entry tells that the last backup is stale.
        conn.execute("UPDATE account_user SET full_name = 'Changed Again' WHERE id = 4")
    assert covering("pass-3") is None
    finished_pass("pass-3")  # consumed that change: its backup may miss a change it applied
    assert covering("pass-4") is None
    finished_pass("pass-4")
    assert "run 'pass-4'" in covering("pass-5")
    with psycopg.connect(legacy) as conn:  # a damaged backup covers nothing
        folder = conn.execute(
            "SELECT backup_path FROM migration_audit.runs WHERE run_id = 'pass-4'"
        ).fetchone()[0]
    next(Path(folder).glob("account_user.csv.gz")).write_bytes(b"damaged")
    assert covering("pass-5") is None


def test_a_change_applied_by_a_run_that_started_earlier_makes_the_backup_stale(legacy, backup_dir):
    """A backfill's runs start in one order and copy in another: pass-a started before pass-b but
    applied a change after pass-b's backup. That backup no longer equals the legacy tables."""
    from user_migration import audit
    from user_migration.backup import backup_covering

    def finished_pass(run_id: str) -> None:
        run_stages(legacy, legacy, SETTINGS, run_id, backup_dir)
        with psycopg.connect(legacy, autocommit=True) as conn:
            audit.finish_run(conn, run_id, "success", {})

    finished_pass("pass-1")
    finished_pass("pass-b")  # nothing changed since pass-1: pass-b's backup is current
    with psycopg.connect(legacy, autocommit=True) as conn:
        assert backup_covering(conn, conn, SETTINGS, "pass-x") is not None
        conn.execute("UPDATE account_user SET full_name = 'Changed Later' WHERE id = 2")
    finished_pass("pass-a")  # consumed that change
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute(
            "UPDATE migration_audit.runs SET started_at = (SELECT started_at - interval '1 hour' "
            "FROM migration_audit.runs WHERE run_id = 'pass-b') WHERE run_id = 'pass-a'"
        )
        # pass-a's own backup is now the older one: the newest backup is pass-b's, taken before
        # the change pass-a applied, so nothing covers the next pass.
        assert backup_covering(conn, conn, SETTINGS, "pass-c") is None


def test_triggers_dropped_altogether_are_not_trusted_after_a_reinstall(legacy, backup_dir):
    """Every capture trigger dropped (a table reloaded outside the tool), a change made, then a pass
    whose plan reinstalls them but whose copy never finishes: the next pass must still compare every row."""
    from user_migration.plan import make_plan

    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:
        for table in ("account_user", "account_user_groups", "account_user_user_permissions"):
            for event in ("insert", "update", "delete", "truncate"):
                conn.execute(f"DROP TRIGGER user_migration_capture_{event} ON {table}")
        conn.execute("UPDATE account_user SET full_name = 'Unlogged' WHERE id = 1")
    with psycopg.connect(legacy, autocommit=True) as conn:
        make_plan(conn, conn, SETTINGS, "pass-2", dt.date.today())  # its partitions never run
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir)
    assert plan_mode(legacy, "pass-3")[0] == "full"
    assert migrated(legacy)[1][6] == "Unlogged"


def test_a_full_comparison_pass_never_counts_as_quiet(legacy, backup_dir):
    """A pass that compared every row may have run while changes went unlogged: its backup is no
    proof that nothing changed since, so the next pass takes its own."""
    from user_migration import audit
    from user_migration.backup import backup_covering

    for run_id, settings in (
        ("pass-1", SETTINGS),
        ("pass-2", SETTINGS),
        ("pass-3", Settings(**{**SETTINGS.__dict__, "full_reconcile": True})),
    ):
        run_stages(legacy, legacy, settings, run_id, backup_dir)
        with psycopg.connect(legacy, autocommit=True) as conn:
            audit.finish_run(conn, run_id, "success", {})
    with psycopg.connect(legacy, autocommit=True) as conn:
        assert backup_covering(conn, conn, SETTINGS, "pass-4") is None


def test_a_link_moved_to_a_user_of_an_earlier_partition_is_kept(legacy, backup_dir):
    """Link 101 moves from user 27 to user 2: user 2's partition runs first and finds the link still
    held by user 27; user 27's partition must not then remove it from user 2."""
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:
        conn.execute("UPDATE account_user_groups SET user_id = 2 WHERE id = 101")
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert plan_mode(legacy, "pass-2")[0] == "log"
    assert (101, 2, 1) in snapshot(legacy)["groups"]


def test_writes_made_during_the_full_verification_are_caught_up_before_the_lock(
    legacy, backup_dir, monkeypatch
):
    """The verification scans every row (17 s at 10M users); what the application wrote meanwhile is
    caught up, tracked, before the lock, so the final sync under the lock does not grow with the table."""
    validated_pass(legacy, "pass-1", backup_dir)
    verify = cutover_module._verify_target

    def verify_while_the_application_writes(target):
        with psycopg.connect(legacy, autocommit=True) as app:
            for n in range(60):  # more than final_backlog (50) users
                app.execute(
                    "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
                    "phone_number, is_active, is_staff) VALUES ('pbkdf2_sha256$x', false, %s, %s, 'During Verify', "
                    "'1991-01-01', '9841000001', true, false)",
                    (f"during{n}@example.com", f"during{n}"),
                )
        return verify(target)

    monkeypatch.setattr(cutover_module, "_verify_target", verify_while_the_application_writes)
    result = cutover(legacy, "pass-1")
    assert result["final_sync"]["users"] == 0 and result["catch_up"]["users"] == 60
    assert result["source_checksum"] == result["target_checksum"]
    assert migrated(legacy) == expected_target(legacy, dt.date.today())


def test_installing_capture_beside_a_sign_up_transaction_retries_its_deadlock(legacy):
    """A sign-up (user, then its group link, in one transaction) is open when capture is installed:
    the install takes the link tables first and waits for the users table, then the sign-up writes
    a link: a deadlock. PostgreSQL aborts the install (it waited first); the sign-up commits, and
    the install's next attempt puts every trigger in place."""
    from support.locks import SIGNUP, in_background, wait_until_queued

    from user_migration import capture

    app = psycopg.connect(legacy, application_name="application")
    app.execute("SET deadlock_timeout = '60s'")  # the install is the side that detects it
    app.commit()
    new_id = app.execute(SIGNUP[0]).fetchone()[0]

    def install() -> bool:
        with psycopg.connect(legacy, autocommit=True) as conn:
            capture.install(conn, SETTINGS.mapping)
            return capture.status(conn, SETTINGS.mapping).installed

    thread, outcome = in_background(install)
    try:
        wait_until_queued(legacy, "account_user", "ShareRowExclusiveLock", thread, outcome)
        app.execute(SIGNUP[1], {"id": new_id})
        app.commit()
    finally:
        app.close()
        thread.join(120)
    assert outcome == {"result": True}
