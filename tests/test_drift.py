"""Drift between the sync state and the target is repaired by the next pass, not stuck (issue 14, item 2).

A delta pass reads only the legacy rows whose hash changed, so a target row deleted by hand while
the state says migrated, or a target row the state does not know, used to stay wrong for every later
pass, and every validation and cutover after it failed.
"""

from __future__ import annotations

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import run_stages, snapshot

from user_migration import audit, partition_copy
from user_migration.config import Settings

SETTINGS = Settings(partitions=3, batch_size=5)
NEW_USER_SQL = (
    "INSERT INTO account_newuser (id, password, is_superuser, email, username, full_name, date_of_birth, "
    "phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
    "(%s, 'x', false, %s, %s, 'Stray', '1990-01-01', '', true, false, now(), now())"
)


@pytest.fixture
def legacy(make_db, backup_dir) -> str:
    dsn = make_db("drift")
    fx.load(dsn)
    run_stages(dsn, dsn, SETTINGS, "first", backup_dir)
    return dsn


def drift(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return audit.sync_drift(conn)


def test_a_migrated_user_deleted_by_hand_is_back_after_the_next_pass(legacy, backup_dir):
    before = snapshot(legacy)
    with psycopg.connect(legacy) as conn:
        conn.execute("DELETE FROM account_newuser WHERE id = 1")  # its profile and links go with it
    assert drift(legacy) == {"missing": 1, "rejected": 0, "unknown": 0}

    result = run_stages(legacy, legacy, SETTINGS, "second", backup_dir)
    assert snapshot(legacy) == before  # the user, its links and its profile
    assert result["drift_repaired"] == 1
    assert result["inserted"] == 1
    assert drift(legacy) == {"missing": 0, "rejected": 0, "unknown": 0}
    assert result["migrated"] + result["rejected"] == len(fx.ROWS)


def test_target_rows_the_state_does_not_know_are_brought_in_line(legacy, backup_dir):
    before = snapshot(legacy)
    with psycopg.connect(legacy) as conn:
        # A restore of the target from an older dump: user 2 has old values and no sync state.
        conn.execute("UPDATE account_newuser SET full_name = 'Old Name' WHERE id = 2")
        conn.execute("DELETE FROM migration_audit.source_state WHERE source_id = 2")
        # User 4 is rejected (invalid email), yet a row of it appeared in the target.
        conn.execute(NEW_USER_SQL, (4, "four@example.com", "four"))
        # No legacy user has id 500: a row of no user.
        conn.execute(NEW_USER_SQL, (500, "stray@example.com", "stray"))
    assert drift(legacy) == {"missing": 0, "rejected": 1, "unknown": 2}

    result = run_stages(legacy, legacy, SETTINGS, "second", backup_dir)
    assert snapshot(legacy) == before
    assert result["drift_repaired"] == 3
    assert drift(legacy) == {"missing": 0, "rejected": 0, "unknown": 0}
    with psycopg.connect(legacy) as conn:
        assert conn.execute(
            "SELECT outcome FROM migration_audit.source_state WHERE source_id IN (2, 4, 500) ORDER BY source_id"
        ).fetchall() == [("M",), ("R",)]
    # The next pass finds nothing left to repair.
    assert run_stages(legacy, legacy, SETTINGS, "third", backup_dir)["drift_repaired"] == 0


def test_validation_names_the_drift_left(legacy):
    with psycopg.connect(legacy) as conn:
        conn.execute("DELETE FROM account_newuser WHERE id = 1")
        conn.execute(NEW_USER_SQL, (500, "stray@example.com", "stray"))
        message = audit.drift_message(audit.sync_drift(conn))
    assert message.startswith(
        "sync drift: 1 migrated per the sync state but missing from account_newuser, "
        "1 in account_newuser without sync state; the next pass re-processes these ids"
    )
    assert "stray" not in message and "@" not in message


def test_the_validate_task_fails_naming_the_drift(legacy, monkeypatch):
    from user_migration.errors import ValidationFailed
    from user_migration.hooks import MigrationDbHook
    from user_migration.operators import GreatExpectationsValidationOperator

    monkeypatch.setenv("AIRFLOW_CONN_TARGET_DB", legacy)
    operator = GreatExpectationsValidationOperator(task_id="validate")
    operator._target_hook = MigrationDbHook("target_db")
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute(NEW_USER_SQL, (500, "stray@example.com", "stray"))
        with pytest.raises(ValidationFailed, match="sync drift: 1 in account_newuser without sync state"):
            operator.run({"run_id": "first"}, SETTINGS, conn)
        stored = conn.execute(
            "SELECT success, observed FROM migration_audit.validation_results "
            "WHERE run_id = 'first' AND expectation = 'no_sync_drift'"
        ).fetchone()
    assert stored == (False, {"missing": 0, "rejected": 0, "unknown": 1})


def compared(dsn: str, run_id: str) -> list[bool]:
    """Per partition of ``run_id``: whether it compared sync state and target in full."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT drift_writes IS NOT NULL FROM migration_audit.partitions WHERE run_id = %s ORDER BY partition_no",
            (run_id,),
        ).fetchall()
    return [row[0] for row in rows]


def no_comparison(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("this pass must not compare sync state and target in full")

    monkeypatch.setattr(partition_copy, "_drift", refuse)


def test_after_a_full_comparison_log_passes_leave_it_out_whatever_they_write(legacy, backup_dir, monkeypatch):
    """The write triggers were (re)installed after "first": "second" compares everything and
    becomes the proof. The next passes leave the comparison out, also after their own writes."""
    run_stages(legacy, legacy, SETTINGS, "second", backup_dir)
    assert compared(legacy, "second") == [True, True, True]
    no_comparison(monkeypatch)
    with psycopg.connect(legacy) as conn:
        conn.execute("UPDATE account_user SET full_name = 'Alice Changed' WHERE id = 1")
    assert run_stages(legacy, legacy, SETTINGS, "third", backup_dir)["updated"] == 1  # a target write
    run_stages(legacy, legacy, SETTINGS, "fourth", backup_dir)
    assert compared(legacy, "third") == compared(legacy, "fourth") == [False, False, False]


def test_a_hand_edit_after_the_proof_is_found_and_repaired(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "second", backup_dir)
    before = snapshot(legacy)
    with psycopg.connect(legacy) as conn:
        conn.execute("DELETE FROM account_newuser WHERE id = 1")
    result = run_stages(legacy, legacy, SETTINGS, "third", backup_dir)
    assert result["drift_repaired"] == 1 and snapshot(legacy) == before
    assert compared(legacy, "third") == [True, True, True]


def test_a_write_with_a_trigger_disabled_is_found_and_repaired(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "second", backup_dir)
    before = snapshot(legacy)
    with psycopg.connect(legacy) as conn:
        conn.execute("ALTER TABLE account_newuser DISABLE TRIGGER user_migration_writes_delete")
        conn.execute("DELETE FROM account_newuser WHERE id = 1")  # not noted
    result = run_stages(legacy, legacy, SETTINGS, "third", backup_dir)
    assert result["drift_repaired"] == 1 and snapshot(legacy) == before


def test_drift_the_triggers_missed_is_repaired_after_the_validation_finds_it(legacy, backup_dir, monkeypatch):
    """A trigger disabled and enabled again leaves no trace: the validation's full comparison finds
    the drift and notes it, so the next pass compares and repairs rather than leaves it."""
    from user_migration.errors import ValidationFailed
    from user_migration.hooks import MigrationDbHook
    from user_migration.operators import GreatExpectationsValidationOperator

    run_stages(legacy, legacy, SETTINGS, "second", backup_dir)
    before = snapshot(legacy)
    with psycopg.connect(legacy) as conn:
        conn.execute("ALTER TABLE account_newuser DISABLE TRIGGER user_migration_writes_delete")
        conn.execute("DELETE FROM account_newuser WHERE id = 1")
        conn.execute("ALTER TABLE account_newuser ENABLE TRIGGER user_migration_writes_delete")
    monkeypatch.setenv("AIRFLOW_CONN_TARGET_DB", legacy)
    operator = GreatExpectationsValidationOperator(task_id="validate")
    operator._target_hook = MigrationDbHook("target_db")
    with (
        psycopg.connect(legacy, autocommit=True) as conn,
        pytest.raises(ValidationFailed, match="sync drift: 1 migrated per the sync state"),
    ):
        operator.run({"run_id": "second"}, SETTINGS, conn)
    result = run_stages(legacy, legacy, SETTINGS, "third", backup_dir)
    assert result["drift_repaired"] == 1 and snapshot(legacy) == before
