"""The GX suite is taken over, not run, only while the target is provably what a passed suite saw
(validation_reuse.py): a quiet pass writes nothing, and any write to a checked table, by a pass or
by hand, makes the next validation run the suite."""

from __future__ import annotations

import psycopg
import pytest
from support.pipeline import run_stages
from support.sync import SETTINGS

from user_migration.validation import validate_target
from user_migration.validation_reuse import TRIGGERS, run_suite


class Suite:
    """run_suite with the real GX suite, counting how often it ran."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        self.runs = 0

    def validate(self, url: str, *, expected_users: int):
        self.runs += 1
        return validate_target(url, expected_users=expected_users)

    def __call__(self, run_id: str, **kwargs):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrated = conn.execute("SELECT count(*) FROM account_newuser").fetchone()[0]
            return run_suite(conn, self.url, run_id, migrated, validate=self.validate, **kwargs)


def writes(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM migration_audit.target_writes").fetchone()[0]


def write(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def failed(result) -> list[str]:
    return [o.name for o in result.outcomes if not o.success]


def test_a_quiet_pass_takes_the_suite_over_and_a_hand_edit_runs_it_again(legacy, backup_dir):
    suite = Suite(legacy)
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    first = suite("pass-1")
    assert (first.ran, failed(first), suite.runs) == (True, [], 1)
    assert first.note == "suite run: no suite has passed on the target yet"

    noted = writes(legacy)
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert writes(legacy) == noted  # a quiet pass changes no row of the checked tables
    second = suite("pass-2")
    assert (second.ran, second.basis_run, suite.runs) == (False, "pass-1", 1)
    assert second.outcomes == first.outcomes
    assert second.note.startswith("suite not run: the target is as it was when run pass-1's suite passed")
    with psycopg.connect(legacy) as conn:
        assert conn.execute(
            "SELECT run_id, ran, basis_run, passed FROM migration_audit.suite_runs ORDER BY recorded_at"
        ).fetchall() == [("pass-1", True, None, True), ("pass-2", False, "pass-1", True)]

    # Someone edits the target by hand: the suite runs again, and catches it.
    write(legacy, "UPDATE account_newuser SET phone_number = '0041 79' WHERE id = 1")
    third = suite("pass-3")
    assert (third.ran, suite.runs) == (True, 2)
    assert third.note == "suite run: the target was written since run pass-2's suite passed"
    assert failed(third) == ["phone_e164_or_empty"]
    fourth = suite("pass-4")  # a failed suite is never taken over
    assert (fourth.ran, failed(fourth), suite.runs) == (True, ["phone_e164_or_empty"], 3)


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM account_profile WHERE user_id = 1",
        "INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (2, 3)",
        "TRUNCATE account_newuser_user_permissions",
        "VACUUM FULL account_newuser",
        "ALTER TABLE account_newuser ALTER COLUMN full_name TYPE text",
    ],
)
def test_any_write_or_rewrite_of_a_checked_table_runs_the_suite(legacy, backup_dir, statement):
    suite = Suite(legacy)
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    suite("pass-1")
    write(legacy, statement)
    result = suite("pass-2")
    assert (result.ran, suite.runs) == (True, 2)


def test_a_disabled_trigger_or_full_reconcile_runs_the_suite(legacy, backup_dir):
    suite = Suite(legacy)
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    suite("pass-1")
    assert suite("pass-2", force=True).note == "suite run: full_reconcile requested"
    write(legacy, "ALTER TABLE account_profile DISABLE TRIGGER user_migration_writes_delete")
    result = suite("pass-3")
    assert result.ran and result.note.startswith(
        f"suite run: {TRIGGERS - 1} of the {TRIGGERS} write triggers"
    )
    # The next pass puts it back, noting that writes may have gone unnoted meanwhile.
    run_stages(legacy, legacy, SETTINGS, "pass-4", backup_dir)
    result = suite("pass-4")
    assert result.ran and "written since" in result.note, result.note
    assert (suite("pass-5").ran, suite.runs) == (False, 4)


def test_a_cutover_and_its_rollback_run_the_suite_again_whatever_the_triggers(legacy, backup_dir):
    """The cutover disables the write triggers: the application's writes to the new tables are not
    noted. Someone re-enables them after the rollback; the suite must still run, not be taken over
    from before the cutover."""
    import datetime as dt

    from user_migration.cutover import CutoverOptions, run_cutover
    from user_migration.rollback import carry_back

    suite = Suite(legacy)
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    assert not failed(suite("pass-1"))
    write(
        legacy,
        "INSERT INTO migration_audit.validation_results (run_id, expectation, success) VALUES ('pass-1', 'x', true)",
    )
    with psycopg.connect(legacy, autocommit=True) as conn:
        run_cutover(conn, conn, SETTINGS, "pass-1", dt.date.today(), "test", CutoverOptions())
    write(legacy, "UPDATE account_newuser SET full_name = 'Written After The Cutover' WHERE id = 1")
    with psycopg.connect(legacy, autocommit=True) as conn:
        carry_back(conn, conn, SETTINGS, "test", "rollback-1")
    write(legacy, "ALTER TABLE account_newuser ENABLE TRIGGER ALL")
    write(legacy, "ALTER TABLE account_profile ENABLE TRIGGER ALL")
    write(legacy, "ALTER TABLE account_newuser_groups ENABLE TRIGGER ALL")
    write(legacy, "ALTER TABLE account_newuser_user_permissions ENABLE TRIGGER ALL")
    result = suite("pass-2")
    assert result.ran and "written since" in result.note, result.note
    # Noted by the cutover and the rollback themselves, not left to the triggers' state.
    with psycopg.connect(legacy) as conn:
        notes = conn.execute(
            "SELECT op FROM migration_audit.target_writes WHERE op IN ('CUTOVER', 'ROLLBACK') ORDER BY seq"
        ).fetchall()
    assert notes == [("CUTOVER",), ("ROLLBACK",)]
