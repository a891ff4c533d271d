"""The migration yields to the application (issue 19), on a real PostgreSQL: a pause by hand holds a
running partition between batches and a resume finishes it exactly; a probe past its stop threshold
stops the partition with nothing committed; batch sizes follow the server's speed; a partition read
in many snapshots ends exact, the change log catching what changed between them.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import psycopg
import pytest
from psycopg import sql
from support import fixture_users as fx
from support.fault_tools import (
    RUN,
    assert_fixture_outcome,
    finish_run,
    nothing_committed,
    partition_states,
    prepare_run,
)
from support.pipeline import run_stages
from support.sync import expected_target, migrated
from throttle import set_state, status

from user_migration import partition_copy
from user_migration.config import ConfigError, Settings
from user_migration.db import ensure_audit_schema
from user_migration.errors import MigrationError
from user_migration.partition_copy import copy_partition
from user_migration.throttle import Throttle


def events(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT partition_no, event, signal, value, threshold, detail FROM migration_audit.throttle_events "
            "ORDER BY id"
        ).fetchall()


def batches(dsn: str, run_id: str = RUN, partition_no: int = 0) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT batch_no, rows_in, target_rows, snapshot_no, waited_seconds FROM migration_audit.batches "
            "WHERE run_id = %s AND partition_no = %s ORDER BY batch_no",
            (run_id, partition_no),
        ).fetchall()


def copy_one(dsn: str, settings: Settings, partition: dict):
    with psycopg.connect(dsn, autocommit=True) as source, psycopg.connect(dsn, autocommit=True) as target:
        return copy_partition(source, target, settings, RUN, partition)


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_pause_by_hand_holds_the_partition_between_batches_and_resume_ends_exact(legacy, backup_dir):
    settings = Settings(partitions=2, batch_size=3, batch_seconds=0, throttle_check_ms=0)
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    written: list[int] = []

    def after_batch(batch_no: int) -> None:
        written.append(batch_no)
        if batch_no == 1:  # the operator pauses while batch 1 is being written
            set_state(legacy, "pause", 0, "dba-alice")

    source = psycopg.connect(legacy, autocommit=True)
    target = psycopg.connect(legacy, autocommit=True)
    outcome: list[object] = []

    def copy() -> None:
        try:
            outcome.append(copy_partition(source, target, settings, RUN, partitions[0]))
        except Exception as exc:  # reported by the assertions below
            outcome.append(exc)

    original = partition_copy.kill_after_batch
    partition_copy.kill_after_batch = after_batch
    worker = threading.Thread(target=copy)
    try:
        worker.start()
        wait_until(lambda: any(e[1] == "manual" and "pause" in e[5] for e in events(legacy)))
        time.sleep(1.5)  # paused: no batch is written however long we wait
        assert written == [0, 1] and worker.is_alive() and not outcome
        with psycopg.connect(legacy, autocommit=True) as admin:
            # The paused partition ended its legacy snapshot: it holds back no vacuum, no lock.
            state, xmin = admin.execute(
                "SELECT state, backend_xmin FROM pg_stat_activity WHERE pid = %s", (source.info.backend_pid,)
            ).fetchone()
        assert (state, xmin) == ("idle", None)
        assert status(legacy)[0][:3] == ("pause", 0, "dba-alice")
        set_state(legacy, "run", 0, "dba-alice")
        worker.join(30)
    finally:
        partition_copy.kill_after_batch = original
        set_state(legacy, "run", 0, "test cleanup")
        worker.join(30)
        source.close()
        target.close()
    assert not worker.is_alive()
    assert not isinstance(outcome[0], Exception), outcome
    assert written == [0, 1, 2, 3, 4]
    recorded = batches(legacy)
    assert [(b[0], b[1]) for b in recorded] == [(0, 3), (1, 3), (2, 3), (3, 3), (4, 3)]
    assert recorded[2][3] == 2, "batch 2 was read in a new snapshot, after the pause"
    assert recorded[2][4] >= 1.5, "the wait before batch 2 is on record"
    kinds = [(e[1], e[5]) for e in events(legacy)]
    assert ("manual", "state pause, set by dba-alice") in kinds
    assert ("manual", "state run, set by dba-alice") in kinds
    assert any(kind == "resume" for kind, _ in kinds)
    finish_run(legacy, settings, partitions, skip=0)
    assert partition_states(legacy) == [(0, "done", 1, 15), (1, "done", 1, 14)]
    assert_fixture_outcome(legacy, RUN)


def test_slow_by_hand_sleeps_between_batches(legacy, backup_dir):
    settings = Settings(partitions=2, batch_size=3, batch_seconds=0, throttle_check_ms=0)
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    set_state(legacy, "slow", 150, "dba-bob")
    result = copy_one(legacy, settings, partitions[0])
    assert result.throttled_seconds >= 5 * 0.15
    assert all(b[4] >= 0.15 for b in batches(legacy)[1:])


def test_a_probe_past_its_stop_threshold_stops_the_partition_and_the_retry_is_exact(legacy, backup_dir):
    settings = Settings(partitions=2, batch_size=3, throttle_check_ms=0, throttle_probe_sql="SELECT 1000")
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    with pytest.raises(MigrationError) as stopped:
        copy_one(legacy, settings, partitions[0])
    message = str(stopped.value)
    assert "probe is 1000, above the threshold 100 on the legacy server" in message
    assert "throttle_probe_stop" in message and "Nothing of this attempt was kept" in message
    assert nothing_committed(legacy, partitions[0]) == dict.fromkeys(
        ("users", "groups", "rejected_rows", "field_fixes", "batches"), 0
    )
    assert partition_states(legacy) == [(0, "failed", 1, None)]
    assert [e[1:5] for e in events(legacy) if e[1] == "stop"] == [("stop", "probe", 1000.0, 100.0)]

    calm = Settings(partitions=2, batch_size=3, throttle_check_ms=0, throttle_probe_sql="SELECT 0")
    finish_run(legacy, calm, partitions)  # the retry, the server calm again
    assert partition_states(legacy) == [(0, "done", 2, 15), (1, "done", 1, 14)]
    assert_fixture_outcome(legacy, RUN)


def test_a_pause_on_a_signal_longer_than_allowed_stops_the_partition(legacy, backup_dir):
    settings = Settings(
        partitions=2, throttle_check_ms=0, throttle_probe_sql="SELECT 50", throttle_max_pause_seconds=1
    )
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    with pytest.raises(MigrationError, match="probe is 50, above the threshold 1 for more than"):
        copy_one(legacy, settings, partitions[0])
    assert [e[1] for e in events(legacy)][-2:] == ["pause", "stop"]
    assert nothing_committed(legacy, partitions[0])["users"] == 0


@pytest.mark.parametrize(
    "probe", ["DELETE FROM account_user", "SELECT 1; DROP TABLE account_user", "VACUUM", "select"]
)
def test_anything_but_one_select_is_refused_as_a_probe(probe):
    with pytest.raises(ConfigError, match="single SELECT"):
        Settings.from_params({"throttle_probe_sql": probe})


def test_a_probe_that_fails_names_the_param(legacy, backup_dir):
    settings = Settings(partitions=2, throttle_check_ms=0, throttle_probe_sql="SELECT 'many'")
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    with pytest.raises(MigrationError, match="throttle_probe_sql must return exactly one row of one number"):
        copy_one(legacy, settings, partitions[0])


def test_batch_sizes_follow_the_speed_of_the_server(make_db, backup_dir, monkeypatch):
    settings = Settings(partitions=2, batch_size=4, batch_min_rows=1, batch_max_rows=64, batch_seconds=0.2)

    def sizes(slow: bool) -> list[int]:
        dsn = make_db("thr")
        fx.load(dsn)
        partitions = prepare_run(dsn, dsn, settings, RUN, backup_dir / str(slow))
        with psycopg.connect(dsn, autocommit=True) as sleeper:

            def slowed(batch_no: int, rows: list[tuple]) -> None:
                if slow:  # a legacy server that takes 0.1 s per row
                    sleeper.execute("SELECT pg_sleep(%s)", (0.1 * len(rows),))

            monkeypatch.setattr(partition_copy, "batch_read", slowed)
            with (
                psycopg.connect(dsn, autocommit=True) as source,
                psycopg.connect(dsn, autocommit=True) as target,
            ):
                copy_partition(source, target, settings, RUN, partitions[0])
        return [b[2] for b in batches(dsn)]

    fast, slow = sizes(slow=False), sizes(slow=True)
    assert fast[:3] == [4, 8, 16], fast  # well under 0.2 s a batch: doubling, the most per step
    assert slow[0] == 4 and slow[1] < 4 and max(slow[1:]) < 4, slow  # 0.4 s for 4 rows: about 2 a batch


def test_a_partition_read_in_many_snapshots_ends_exact_with_the_change_log(legacy, backup_dir, monkeypatch):
    """max_snapshot_seconds=0: a new legacy snapshot before every batch; the application writes to a
    row already read and to one not yet read while partition 0 runs. The first pass has the later
    write; the change log, consumed only as far as the first snapshot saw it, brings the other."""
    settings = Settings(partitions=2, batch_size=3, batch_seconds=0, max_snapshot_seconds=0)

    def application(batch_no: int, rows: list[tuple]) -> None:
        if batch_no == 1 and rows[0][0] == 4:
            with psycopg.connect(legacy, autocommit=True) as app:
                app.execute("UPDATE account_user SET full_name = 'Read Before' WHERE id = 2")
                app.execute("UPDATE account_user SET full_name = 'Read After' WHERE id = 12")

    monkeypatch.setattr(partition_copy, "batch_read", application)
    run_stages(legacy, legacy, settings, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:
        snapshots = conn.execute(
            "SELECT partition_no, snapshots, batches.n FROM migration_audit.partitions "
            "JOIN (SELECT partition_no, count(DISTINCT snapshot_no) AS n FROM migration_audit.batches "
            "WHERE run_id = 'pass-1' GROUP BY partition_no) AS batches USING (partition_no) "
            "WHERE run_id = 'pass-1' ORDER BY partition_no"
        ).fetchall()
        names = dict(conn.execute("SELECT id, full_name FROM account_newuser WHERE id IN (2, 12)").fetchall())
        logged = {r[0] for r in conn.execute("SELECT source_id FROM user_migration_changes").fetchall()}
    assert [(no, n) for no, _, n in snapshots] == [(0, 5), (1, 5)], "one snapshot per batch"
    assert all(total >= 5 for _, total, _ in snapshots)
    assert names[12] == "Read After" and names[2] != "Read Before"
    assert logged == {2, 12}, "the changes after the first snapshot stay in the log"

    monkeypatch.undo()
    run_stages(legacy, legacy, settings, "pass-2", backup_dir)  # log path: ids read in new snapshots
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT count(*) FROM user_migration_changes").fetchone()[0] == 0


def test_active_backends_past_the_stop_threshold_stop_the_partition(legacy, backup_dir):
    """Two application sessions running a statement; the stop threshold is 1."""
    settings = Settings(partitions=2, throttle_check_ms=0, throttle_active_backends_stop=1)
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    sessions = [psycopg.connect(legacy, autocommit=True) for _ in range(2)]
    busy = [threading.Thread(target=s.execute, args=("SELECT pg_sleep(4)",)) for s in sessions]
    try:
        for thread in busy:
            thread.start()
        wait_until(lambda: len([e for e in active(legacy) if e == "active"]) >= 2)
        with pytest.raises(MigrationError, match="active_backends is 2, above the threshold 1"):
            copy_one(legacy, settings, partitions[0])
    finally:
        for thread in busy:
            thread.join()
        for session in sessions:
            session.close()
    assert nothing_committed(legacy, partitions[0])["users"] == 0


def active(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT state FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(4)%%' AND pid <> pg_backend_pid()"
            ).fetchall()
        ]


def test_a_role_without_pg_monitor_is_told_once_and_the_other_signals_go_on(legacy, pg_server):
    """No pg_read_all_stats: the replay lag is not read (said once, in the audit); the rest is."""
    role = "thr_plain"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    params = psycopg.conninfo.conninfo_to_dict(legacy)
    plain = psycopg.connect(**{**params, "user": role}, autocommit=True)
    try:
        with psycopg.connect(legacy, autocommit=True) as target:
            ensure_audit_schema(target)
            gate = Throttle(
                Settings(throttle_check_ms=0, throttle_probe_sql="SELECT 0"), RUN, 0, plain, target
            )
            for _ in range(3):
                assert gate.gate() < 1
            gate.close()
        unreadable = [(e[1], e[2]) for e in events(legacy) if e[1] == "unreadable"]
        assert unreadable == [("unreadable", "active_backends"), ("unreadable", "replay_lag")]
    finally:
        plain.close()
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
