"""A quiet pass costs what changed (issue 13 item 4): the plan takes over the last plan's duplicate
decision only when the legacy table provably did not change since, and the result is the same as
a pass that scans every row."""

from __future__ import annotations

import datetime as dt

import psycopg
from support.pipeline import rejects, run_stages, snapshot
from support.sync import SETTINGS

from user_migration import plan as plan_module
from user_migration.config import Settings

FULL = Settings(**{**SETTINGS.__dict__, "full_reconcile": True})


def plan_of(dsn: str, run_id: str) -> tuple:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT changes, duplicates, duplicates_from, duplicates_note FROM migration_audit.plans "
            "WHERE run_id = %s",
            (run_id,),
        ).fetchone()


def losers(dsn: str, run_id: str) -> set[tuple]:
    with psycopg.connect(dsn) as conn:
        return set(
            conn.execute(
                "SELECT source_id, reason, kept_id FROM migration_audit.plan_duplicates WHERE run_id = %s",
                (run_id,),
            ).fetchall()
        )


def write(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(statement)


def same_as_a_full_pass(dsn: str, run_id: str, backup_dir) -> None:
    """A pass that compares every row and scans for duplicates again changes nothing after ``run_id``."""
    before = snapshot(dsn), rejects(dsn, run_id)
    run_stages(dsn, dsn, FULL, f"{run_id}-full", backup_dir)
    assert plan_of(dsn, f"{run_id}-full")[2] is None  # a full scan
    assert losers(dsn, f"{run_id}-full") == losers(dsn, run_id)
    assert (snapshot(dsn), rejects(dsn, f"{run_id}-full")) == before


def test_a_quiet_pass_takes_over_the_duplicate_decision(legacy, backup_dir, monkeypatch):
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    assert plan_of(legacy, "pass-1")[2:] == (
        None,
        "full scan: the pass compares every row (change capture was (re)installed)",
    )
    first = snapshot(legacy), rejects(legacy, "pass-1")

    def no_scan(*args, **kwargs):
        raise AssertionError("a quiet pass must not scan the legacy table for duplicates")

    monkeypatch.setattr(plan_module, "find_duplicates", no_scan)
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    changes, duplicates, base, note = plan_of(legacy, "pass-2")
    assert (changes, duplicates, base) == ("log", 4, "pass-1")
    assert "taken over from run pass-1" in note
    assert (
        losers(legacy, "pass-2")
        == losers(legacy, "pass-1")
        == {
            (3, "duplicate_email", 1),
            (15, "duplicate_email", 14),
            (23, "duplicate_email", 22),
            (25, "duplicate_email", 24),
        }
    )
    assert (snapshot(legacy), rejects(legacy, "pass-2")) == first
    monkeypatch.undo()
    same_as_a_full_pass(legacy, "pass-2", backup_dir)


def test_a_change_that_makes_a_duplicate_is_rejected_as_in_a_full_pass(legacy, backup_dir):
    """User 12 takes user 10's email: the log names it, so the plan scans, and 12 loses to 10."""
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert plan_of(legacy, "pass-2")[2] == "pass-1"
    write(legacy, "UPDATE account_user SET email = 'IVAN@example.com' WHERE id = 12")
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir)
    assert rejects(legacy, "pass-3")[12] == ("duplicate_email", "same email as user 10, which is kept")
    assert 12 not in {row[0] for row in snapshot(legacy)["users"]}
    changes, duplicates, base, note = plan_of(legacy, "pass-3")
    assert (changes, duplicates, base) == ("log", 5, None)
    assert note == "full scan: the change log holds 1 entries"
    same_as_a_full_pass(legacy, "pass-3", backup_dir)


def test_a_change_consumed_after_the_plan_forbids_taking_its_decision_over(legacy, backup_dir):
    """User 10 takes user 11's email after pass-2's plan and before its copy: pass-2's partitions
    apply it (and consume its log entry) under a decision that never saw it. The log is empty
    again for pass-3, yet pass-2's decision is stale: pass-3 must scan, so that 11 loses to 10."""
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    run_stages(
        legacy,
        legacy,
        SETTINGS,
        "pass-2",
        backup_dir,
        after_plan=lambda: write(legacy, "UPDATE account_user SET email = 'judy@example.com' WHERE id = 10"),
    )
    assert plan_of(legacy, "pass-2")[2] == "pass-1"  # its plan saw an empty log
    # Its partitions found 11 holding the key and rejected 10 for this pass.
    assert rejects(legacy, "pass-2")[10][0] == "duplicate_email"
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir)
    users = {row[0]: row for row in snapshot(legacy)["users"]}
    assert users.get(10, [None] * 5)[4] == "judy@example.com" and 11 not in users
    assert rejects(legacy, "pass-3")[11] == ("duplicate_email", "same email as user 10, which is kept")
    base, note = plan_of(legacy, "pass-3")[2:]
    assert base is None
    assert "consumed 1 change-log entries, its plan saw 0" in note
    same_as_a_full_pass(legacy, "pass-3", backup_dir)
    run_stages(legacy, legacy, SETTINGS, "pass-4", backup_dir)  # quiet again: taken over
    assert plan_of(legacy, "pass-4")[2] == "pass-3-full"


def test_a_new_day_scans_while_a_row_is_born_in_the_future(legacy, backup_dir):
    """User 8 is rejected as born in the future: on a later date it may be valid, and claim a key."""
    today = dt.date.today()
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir, as_of=today)
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir, as_of=today + dt.timedelta(days=1))
    base, note = plan_of(legacy, "pass-2")[2:]
    assert base is None and "1 rows rejected as born in the future" in note
    write(legacy, "UPDATE account_user SET date_of_birth = '1990-01-01' WHERE id = 8")
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir, as_of=today + dt.timedelta(days=1))
    run_stages(legacy, legacy, SETTINGS, "pass-4", backup_dir, as_of=today + dt.timedelta(days=2))
    assert plan_of(legacy, "pass-4")[2] == "pass-3"  # no row left born in the future


def test_other_transform_settings_scan(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    other = Settings(**{**SETTINGS.__dict__, "invalid_phone": "reject"})
    run_stages(legacy, legacy, other, "pass-2", backup_dir)
    base, note = plan_of(legacy, "pass-2")[2:]
    assert base is None and "transform settings differ" in note


def test_runs_that_start_in_one_order_and_plan_in_another_take_over_the_newest_plan(legacy, backup_dir):
    """A backfill's runs (or a cleared older run) start in one order and take the lease in another:
    pass-a started first but planned last, after user 1 gave up the email user 3 shared with it.
    The quiet pass after both takes pass-a's decision (the newest plan), so user 3 stays migrated;
    ordered by start time it took pass-b's, where 3 lost to 1, and dropped user 3 again."""
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    run_stages(legacy, legacy, SETTINGS, "pass-b", backup_dir)
    assert (3, "duplicate_email", 1) in losers(legacy, "pass-b")
    write(legacy, "UPDATE account_user SET email = 'only-one@example.com' WHERE id = 1")
    run_stages(legacy, legacy, SETTINGS, "pass-a", backup_dir)
    write(
        legacy,
        "UPDATE migration_audit.runs SET started_at = (SELECT started_at - interval '1 hour' "
        "FROM migration_audit.runs WHERE run_id = 'pass-b') WHERE run_id = 'pass-a'",
    )
    assert 3 in {row[0] for row in snapshot(legacy)["users"]}
    run_stages(legacy, legacy, SETTINGS, "pass-c", backup_dir)
    assert plan_of(legacy, "pass-c")[2] == "pass-a"
    assert 3 in {row[0] for row in snapshot(legacy)["users"]}
    same_as_a_full_pass(legacy, "pass-c", backup_dir)


def test_a_pass_dated_before_the_base_plan_scans(legacy, backup_dir):
    """With Celery each worker has its own clock: a plan dated before the last one (a clock behind,
    near midnight) may judge a row born in the future differently, so it does not take it over."""
    today = dt.date.today()
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir, as_of=today)
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir, as_of=today - dt.timedelta(days=1))
    base, note = plan_of(legacy, "pass-2")[2:]
    assert base is None and "a later date than this pass's" in note
