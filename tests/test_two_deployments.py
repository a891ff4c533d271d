"""Two Airflow deployments run the DAG against one target at the same moment: one writes, the other
waits for the writer lease a bounded time and fails naming the holder's run; nothing is written twice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import pytest
from airflow_env import VENV_BIN, airflow_env, prepare_metadata
from support import fixture_users as fx
from support.pipeline import snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
# Enough rows that the first run still holds the lease when the second asks (both start together).
BULK = 50_000


def test_two_deployments_at_once_one_writes_the_other_fails_clearly(make_db, tmp_path: Path):
    legacy = make_db("twice")
    fx.load(legacy)
    with psycopg.connect(
        legacy
    ) as conn:  # enough rows that the first run is still writing when the second asks
        conn.execute(
            "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) SELECT 'h', false, 'bulk' || g || '@example.com', 'bulk' || g, "
            "'Bulk User', '1990-01-01', '', true, false FROM generate_series(1, %s) AS g",
            (BULK,),
        )
    envs = {}
    for name in ("east", "west"):
        envs[name] = airflow_env(tmp_path / name, legacy, tmp_path / f"{name}-backups")
        # Airflow 3.3.2's `dags test` cannot finish a run of a DAG with a deadline (see airflow_env.dags_test).
        envs[name]["USER_MIGRATION_PASS_DEADLINE_MINUTES"] = "off"
        prepare_metadata(envs[name])
    procs, logs = [], []
    conf = '{"max_reject_ratio": 0.5, "lock_wait_seconds": 2, "batch_size": 500}'
    for name, env in envs.items():  # started together, after both are set up
        log = tmp_path / f"{name}.log"
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [str(VENV_BIN / "airflow"), "dags", "test", "user_migration", "-c", conf],
                env=env,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            )
        )
    codes = [p.wait(timeout=600) for p in procs]
    outputs = "\n".join(log.read_text() for log in logs)
    # The second run's backup found the lease taken, waited lock_wait_seconds and failed clearly;
    # its retry (or the run, if retries ran out) then went on only after the first released it.
    assert "the target database is being written by run 'manual__" in outputs
    assert "of DAG 'user_migration'" in outputs and "waited 2 s" in outputs

    with psycopg.connect(legacy) as conn:
        refused = conn.execute(
            "SELECT count(*) FROM migration_audit.task_attempts WHERE task_id = 'backup' AND state = 'failed' "
            "AND message LIKE 'the target database is being written by run %%'"
        ).fetchone()[0]
        windows = conn.execute(
            "SELECT run_id, min(started_at), max(finished_at) FROM migration_audit.partitions "
            "GROUP BY run_id ORDER BY 2"
        ).fetchall()
        runs = dict(conn.execute("SELECT run_id, summary FROM migration_audit.runs").fetchall())
        holder = conn.execute("SELECT run_id FROM migration_audit.writer_lease").fetchone()[0]
        users = conn.execute("SELECT count(*), count(DISTINCT id) FROM account_newuser").fetchone()
    assert refused >= 1
    assert holder is None  # released by whoever finished last
    # Never at once: the partitions of one run all finished before those of the other started.
    if len(windows) == 2:
        assert windows[0][2] <= windows[1][1], windows
    # Nothing written twice: one copy of every migrated user; a second successful run changed nothing.
    assert users[0] == users[1] == len(fx.MIGRATED) + BULK
    assert [u[0] for u in snapshot(legacy)["users"]][: len(fx.MIGRATED)] == sorted(fx.MIGRATED)
    if codes == [0, 0]:
        second = runs[windows[1][0]]
        assert (second["inserted"], second["updated"], second["removed"]) == (0, 0, 0)
    else:
        assert sorted(codes)[0] == 0
