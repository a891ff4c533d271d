"""A quiet pass carries its unchanged rejects over by reference instead of reading them again
(docs/decisions/0013): the pass's accounting, report and plan still see every reject with the reason
of the run that read it, and anything that may change a reject's answer is read again."""

from __future__ import annotations

import datetime as dt

import psycopg
from support import fixture_users as fx
from support.pipeline import rejects, run_stages, snapshot
from support.sync import SETTINGS

from user_migration import audit
from user_migration.partition_copy import copy_partition


def read_again(dsn: str, run_id: str) -> set[int]:
    """The rejects ``run_id`` read and wrote itself."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT source_id FROM migration_audit.rejected_rows WHERE run_id = %s", (run_id,)
        ).fetchall()
    return {row[0] for row in rows}


def carried(dsn: str, run_id: str) -> dict[int, str]:
    """The rejects ``run_id`` carried over: source id -> the run whose rejected_rows holds it."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT i, from_run_id FROM migration_audit.carried_rejects, unnest(source_ids) AS i "
            "WHERE run_id = %s",
            (run_id,),
        ).fetchall()
    return dict(rows)


def accounted(dsn: str, run_id: str) -> tuple[dict, bool]:
    with psycopg.connect(dsn) as conn:
        return audit.reconcile(conn, run_id), audit.every_source_row_accounted(conn, run_id)["success"]


def test_a_quiet_pass_carries_every_reject_with_its_reason(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    first = snapshot(legacy), rejects(legacy, "pass-1")
    assert len(first[1]) > 5  # invalid email, future birth, duplicates ...
    result = run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert read_again(legacy, "pass-2") == set()  # nothing read again
    assert carried(legacy, "pass-2") == {source_id: "pass-1" for source_id in first[1]}
    assert (snapshot(legacy), rejects(legacy, "pass-2")) == first
    summary, ok = accounted(legacy, "pass-2")
    assert ok
    assert summary["migrated"] + summary["rejected"] == len(fx.ROWS)
    assert summary["rejected_by_reason"] == accounted(legacy, "pass-1")[0]["rejected_by_reason"]
    assert sum(p["read"] for p in result["partition_results"]) == 0
    assert sum(p["rejected"] for p in result["partition_results"]) == len(first[1])
    # A third quiet pass carries them from pass-1 still: the run whose rejected_rows holds them.
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir)
    assert carried(legacy, "pass-3") == carried(legacy, "pass-2")
    assert rejects(legacy, "pass-3") == first[1]
    assert accounted(legacy, "pass-3")[1]


def test_a_reject_changed_after_the_plan_is_read_again_and_counted_once(legacy, backup_dir):
    """User 4 gets a valid email after pass-3's plan (which took pass-2's decision over, the log being
    empty): the partition's log names it, so it is read again and migrated, not carried."""
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    assert rejects(legacy, "pass-1")[4][0] == "invalid_email"
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)

    def change() -> None:
        with psycopg.connect(legacy) as conn:
            conn.execute("UPDATE account_user SET email = 'dave@example.com' WHERE id = 4")

    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir, after_plan=change)
    assert 4 not in rejects(legacy, "pass-3") and 4 not in carried(legacy, "pass-3")
    assert len(carried(legacy, "pass-3")) == len(rejects(legacy, "pass-1")) - 1
    assert 4 in {row[0] for row in snapshot(legacy)["users"]}
    summary, ok = accounted(legacy, "pass-3")
    assert ok and summary["migrated"] + summary["rejected"] == len(fx.ROWS)


def test_a_new_day_after_a_carrying_pass_still_sees_the_row_born_in_the_future(legacy, backup_dir):
    """pass-2 carries user 8's "born in the future" reject; the next day's plan must see it through
    run_rejects, and scan rather than take pass-2's decision over."""
    today = dt.date.today()
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir, as_of=today)
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir, as_of=today)
    assert 8 in carried(legacy, "pass-2")
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir, as_of=today + dt.timedelta(days=1))
    with psycopg.connect(legacy) as conn:
        base, note = conn.execute(
            "SELECT duplicates_from, duplicates_note FROM migration_audit.plans WHERE run_id = 'pass-3'"
        ).fetchone()
    assert base is None and "1 rows rejected as born in the future" in note


def test_a_partition_retried_carries_its_rejects_once(legacy, backup_dir):
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    result = run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    before = rejects(legacy, "pass-2")
    with (
        psycopg.connect(legacy, autocommit=True) as source,
        psycopg.connect(legacy, autocommit=True) as target,
    ):
        for partition in result["partition_list"]:
            copy_partition(source, target, SETTINGS, "pass-2", partition)
    assert rejects(legacy, "pass-2") == before
    assert accounted(legacy, "pass-2")[1]


def test_a_reject_a_partition_decided_for_one_pass_is_not_carried_into_the_next(legacy, backup_dir):
    """User 12 takes user 11's email after pass-2's plan: pass-2's partition rejects 12 "for this
    pass" (11 holds the key). pass-3's plan scans (pass-2 consumed a change its plan never saw) and
    makes 12 the loser to 11 as well, but by its own decision: 12 is read again, with that reason."""
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)

    def change() -> None:
        with psycopg.connect(legacy) as conn:
            conn.execute(
                "UPDATE account_user SET email = (SELECT email FROM account_user WHERE id = 11) WHERE id = 12"
            )

    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir, after_plan=change)
    assert rejects(legacy, "pass-2")[12][1].endswith("decided again next pass")
    run_stages(legacy, legacy, SETTINGS, "pass-3", backup_dir)
    assert 12 not in carried(legacy, "pass-3")
    assert rejects(legacy, "pass-3")[12] == ("duplicate_email", "same email as user 11, which is kept")
    assert accounted(legacy, "pass-3")[1]


def test_the_application_s_own_tables_named_like_the_copy_s_temp_tables_survive(legacy, backup_dir):
    """The copy drops its temp tables by name before creating them; with none of that name yet, an
    unqualified DROP found the application's table of the same name through the search path."""
    with psycopg.connect(legacy) as conn:
        for name in ("carried", "stage_users"):
            conn.execute(f"CREATE TABLE public.{name} (note text)")
            conn.execute(f"INSERT INTO public.{name} VALUES ('the application''s')")
    run_stages(legacy, legacy, SETTINGS, "pass-1", backup_dir)
    quiet = run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert {p["path"] for p in quiet["partition_results"]} == {"log"}
    with psycopg.connect(legacy) as conn:
        for name in ("carried", "stage_users"):
            assert conn.execute(f"SELECT note FROM public.{name}").fetchall() == [("the application's",)]
