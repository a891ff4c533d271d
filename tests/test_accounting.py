"""every_source_row_accounted counts the target independently of the partitions' tallies, so it can fail."""

from __future__ import annotations

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import run_stages

from user_migration.audit import every_source_row_accounted
from user_migration.config import Settings

NEW_USER = (
    "INSERT INTO account_newuser (id, password, is_superuser, email, username, full_name, date_of_birth, "
    "phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
    "(%s, 'x', false, %s, %s, 'Stray S', '2000-01-01', '', true, false, now(), now())"
)


@pytest.fixture
def migrated(make_db, backup_dir) -> tuple[str, list[dict]]:
    dsn = make_db("acct")
    fx.load(dsn)
    result = run_stages(dsn, dsn, Settings(partitions=3, batch_size=4), "run-1", backup_dir)
    return dsn, result["partition_list"]


def _owner(partitions: list[dict], user_id: int) -> dict:
    return next(p for p in partitions if p["lo"] <= user_id <= p["hi"])


def test_a_clean_pass_accounts_for_every_row_per_partition(migrated):
    dsn, partitions = migrated
    with psycopg.connect(dsn) as conn:
        outcome = every_source_row_accounted(conn, "run-1")
    assert outcome["success"], outcome
    assert outcome["observed"]["rows_in"] == len(fx.ROWS)
    assert outcome["observed"]["in_target"] == len(fx.MIGRATED)
    assert outcome["observed"]["rejected"] == len(fx.REJECTED)
    assert outcome["observed"]["partitions"] == len(partitions)
    assert outcome["observed"]["partitions_off"] == []


def test_a_migrated_user_missing_from_the_target_fails_naming_its_partition(migrated):
    dsn, partitions = migrated
    gone = sorted(fx.MIGRATED)[len(fx.MIGRATED) // 2]
    part = _owner(partitions, gone)
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM account_newuser WHERE id = %s", (gone,))
        conn.commit()
        outcome = every_source_row_accounted(conn, "run-1")
    assert not outcome["success"]
    message = outcome["details"]["message"]
    assert f"partition {part['partition_no']} (ids {part['lo']}..{part['hi']})" in message
    assert "(off by -1)" in message and "run another pass" in message
    assert [p["partition_no"] for p in outcome["observed"]["partitions_off"]] == [part["partition_no"]]
    assert outcome["observed"]["partitions_off"][0]["difference"] == -1


def test_stray_target_users_fail_inside_a_range_and_outside_every_range(migrated):
    dsn, partitions = migrated
    stray = 30  # no legacy user has this id (the fixture jumps from 28 to 40)
    part = _owner(partitions, stray)
    beyond = max(p["hi"] for p in partitions) + 1000
    with psycopg.connect(dsn) as conn:
        conn.execute(NEW_USER, (stray, "stray1@example.com", "stray1"))
        conn.execute(NEW_USER, (beyond, "stray2@example.com", "stray2"))
        conn.commit()
        outcome = every_source_row_accounted(conn, "run-1")
    assert not outcome["success"]
    message = outcome["details"]["message"]
    assert f"partition {part['partition_no']} (ids {part['lo']}..{part['hi']})" in message
    assert "(off by +1)" in message
    assert "1 users in the target outside every partition's id range" in message
    assert outcome["observed"]["outside_ranges"] == 1
    assert "stray" not in message  # ids and counts only, never a value


def test_a_dry_run_has_nothing_to_count(migrated):
    dsn, _ = migrated
    with psycopg.connect(dsn) as conn:
        outcome = every_source_row_accounted(conn, "run-1", dry_run=True)
    assert outcome["success"] and outcome["observed"] == {"dry_run": True}


def test_the_validate_stage_runs_every_check_and_names_the_failed_one(migrated):
    """checks.run_checks, as the validate task runs it: the accounting, partitions, reject ratio,
    drift and the GX suite all pass after the pass; a reject limit below the fixture's share fails
    that check, and a stray target row the accounting and the drift check, by name."""
    from user_migration.checks import run_checks

    dsn, _ = migrated
    url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        lenient = Settings(max_reject_ratio=0.5)  # the fixture is dirty on purpose: 12 of 29 rejected
        passed = run_checks(conn, "run-1", lenient, url)
        names = [o["name"] for o in passed.outcomes]
        assert names[:4] == [
            "every_source_row_accounted",
            "all_partitions_done",
            "reject_ratio_within_limit",
            "no_sync_drift",
        ]
        assert len(names) > 4 and passed.failed == [] and passed.suite_note
        strict = run_checks(conn, "run-1", Settings(max_reject_ratio=0.1), url)
        assert [o["name"] for o in strict.failed] == ["reject_ratio_within_limit"]
        conn.execute(NEW_USER, (9001, "stray@example.com", "stray"))
        broken = {o["name"] for o in run_checks(conn, "run-1", lenient, url).failed}
        assert {"every_source_row_accounted", "no_sync_drift"} <= broken
