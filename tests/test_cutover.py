"""Sync passes against a database being written to, the cutover, the lease, rollback and restore."""

from __future__ import annotations

import datetime as dt
import threading
import time

import psycopg
import pytest
from support import fixture_users as fx
from support.locks import DELETE, SIGNUP, in_background, wait_until_queued
from support.pipeline import run_stages
from support.sync import SETTINGS, cutover, expected_target, migrated, start_writer, validated_pass

from user_migration.cutover import CutoverRefused, active_cutover


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
    thread, outcome = in_background(lambda: cutover(legacy, "pass-1", backoff_seconds=0.1))
    try:
        wait_until_queued(legacy, waits_on, "ExclusiveLock", thread, outcome)
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


def _refusal_while_a_session_writes(dsn: str, application: str, statement: str) -> str:
    """The cutover's refusal (2 attempts of 200 ms) while ``application`` holds ``statement``'s
    locks in an open transaction."""
    blocker = psycopg.connect(dsn, application_name=application)
    blocker.execute(statement)  # an open transaction
    try:
        with pytest.raises(CutoverRefused) as refused:
            cutover(dsn, "pass-1", lock_timeout_ms=200, attempts=2, backoff_seconds=0.1)
    finally:
        blocker.rollback()
        blocker.close()
    return str(refused.value)


def test_a_session_holding_the_new_tables_is_named_not_the_legacy_tables(legacy, backup_dir):
    """The cutover locks the new tables first (on the target): a session writing them there keeps it
    from starting. The refusal names those tables and that session, not the legacy tables."""
    validated_pass(legacy, "pass-1", backup_dir)
    message = _refusal_while_a_session_writes(
        legacy, "hand-fix", "UPDATE account_newuser SET full_name = full_name WHERE id = 1"
    )
    assert message.startswith("cutover gave up: the new tables (account_newuser, "), message
    assert "could not be locked within 200 ms in 2 attempts" in message and "hand-fix" in message
    assert "the legacy tables stay writable" in message
    with psycopg.connect(legacy) as conn:
        assert active_cutover(conn) is None
        conn.execute("UPDATE account_user SET full_name = 'Writable' WHERE id = 1")


def test_a_session_holding_another_target_table_is_not_blamed_on_the_new_tables(legacy, backup_dir):
    """After the new tables are held, the catch-up needs others (the profiles' write triggers are
    switched off first): a session holding account_profile is reported as such a table, not as the
    new tables with "no session holds them"."""
    validated_pass(legacy, "pass-1", backup_dir)
    message = _refusal_while_a_session_writes(
        legacy, "profile-edit", "UPDATE account_profile SET bio = bio WHERE user_id = 1"
    )
    assert message.startswith("cutover gave up: while it caught up before locking the legacy tables"), message
    assert "could not be locked within 200 ms (last of 2 attempts)" in message
