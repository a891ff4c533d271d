"""The writer lease tells a live holder from a dead one: a live one keeps it, a dead one loses it at once.

Every test holds the lease the way a task does (lease.active on its own connection) and has a second
run ask for it. The SIGKILL of a whole run mid-copy is in tests/test_faults.py.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from user_migration import lease
from user_migration.db import ensure_audit_schema
from user_migration.errors import MigrationError

DAG = "user_migration"


@pytest.fixture
def target(make_db) -> str:
    dsn = make_db("lease")
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_audit_schema(conn)
    return dsn


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def holder_of(dsn: str) -> str | None:
    with connect(dsn) as conn:
        return conn.execute("SELECT run_id FROM migration_audit.writer_lease").fetchone()[0]


def first_task(conn: psycopg.Connection, run_id: str) -> None:
    """The run's first task: takes the lease inside lease.active and ends."""
    with lease.active(conn, run_id, holds=False):
        assert lease.acquire(conn, run_id, DAG, wait_seconds=1, stale_minutes=30) is None


def test_a_live_task_keeps_the_lease_however_long_ago_it_was_renewed(target):
    with connect(target) as task, connect(target) as other:
        with lease.active(task, "run-a", holds=False):
            lease.acquire(task, "run-a", DAG, wait_seconds=1, stale_minutes=30)
            # Even past lease_stale_minutes: the task's session is alive, so the run is.
            other.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '2 hours'")
            started = time.monotonic()
            with pytest.raises(lease.LeaseBusy) as busy:
                lease.acquire(other, "run-b", DAG, wait_seconds=1.5, stale_minutes=30, grace_seconds=30)
            assert 1.4 < time.monotonic() - started < 5
            assert busy.value.holder == "run-a"
            message = str(busy.value)
            assert message.startswith(
                "the target database is being written by run 'run-a' of DAG 'user_migration'"
            )
            assert f"Its tasks are running now (target sessions {task.info.backend_pid} hold" in message
            assert "taken over at once" in message
        assert holder_of(target) == "run-a"


def test_between_two_tasks_the_lease_is_kept_for_the_grace_then_taken_over(target):
    with connect(target) as task, connect(target) as other:
        first_task(task, "run-a")
        with pytest.raises(lease.LeaseBusy) as busy:
            lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        assert busy.value.holder == "run-a"
        assert "It is between two of its tasks" in str(busy.value)
        assert "taken over 120 s after its last task ended (lease_grace_seconds)" in str(busy.value)
        # The run's next task goes on, and as it ends the grace starts again.
        with lease.active(task, "run-a"):
            pass
        task.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '119 seconds'")
        with pytest.raises(lease.LeaseBusy):
            lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        # No task for longer than the grace: presumed dead, its lease taken over, and it cannot write.
        task.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '121 seconds'")
        took = lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        assert took is not None and took.startswith("took over the writer lease of run 'run-a'")
        assert holder_of(target) == "run-b"
        with pytest.raises(MigrationError, match="run 'run-a' does not hold the writer lease"):
            lease.active(task, "run-a").__enter__()


def test_a_run_waiting_for_an_approval_keeps_the_lease_until_its_wait_ends(target):
    """The cutover's approval runs no task while a person decides; a backfill's run asking meanwhile
    must not presume it dead after the grace, only once the wait (timeout plus grace) is over."""
    with connect(target) as task, connect(target) as other:
        first_task(task, "run-a")
        lease.wait_for_answer(task, "run-a", 3600)
        task.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '10 minutes'")
        with pytest.raises(lease.LeaseBusy) as busy:
            lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=5, grace_seconds=120)
        assert busy.value.holder == "run-a"
        assert "waits for a person's answer (the cutover's approval)" in str(busy.value)
        # The answer came: the cutover task runs and ends; from then on the usual grace applies.
        with lease.active(task, "run-a"):
            pass
        task.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '121 seconds'")
        took = lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        assert took is not None and "no task of it has run since the grace" in took
        # A run that lost its lease cannot start waiting for an answer.
        with pytest.raises(MigrationError, match="run 'run-a' does not hold the writer lease"):
            lease.wait_for_answer(task, "run-a", 3600)


def test_a_wait_for_an_answer_that_is_over_no_longer_keeps_the_lease(target):
    with connect(target) as task, connect(target) as other:
        first_task(task, "run-a")
        lease.wait_for_answer(task, "run-a", 60)
        task.execute(
            "UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '10 minutes', "
            "waiting_until = now() - interval '1 second'"
        )
        took = lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        assert took is not None and took.startswith("took over the writer lease of run 'run-a'")


def test_a_task_whose_session_is_gone_loses_the_lease_at_once(target, pg_server):
    with connect(target) as task, connect(target) as other, connect(pg_server) as admin:
        first_task(task, "run-a")
        with lease.active(task, "run-a"):
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (task.info.backend_pid,))
            started = time.monotonic()
            took = lease.acquire(other, "run-b", DAG, wait_seconds=30, stale_minutes=30, grace_seconds=120)
            assert time.monotonic() - started < 2
        assert took is not None and took.endswith(
            "its task died: the lease's advisory lock is gone with its session"
        )
        assert holder_of(target) == "run-b"


def test_one_of_two_parallel_tasks_dying_leaves_the_run_its_lease(target):
    with connect(target) as one, connect(target) as two, connect(target) as other:
        first_task(one, "run-a")
        with lease.active(two, "run-a"):
            one_task = lease.active(one, "run-a")
            one_task.__enter__()
            one.close()  # this mapped task dies; its sibling still runs
            with pytest.raises(lease.LeaseBusy, match=rf"target sessions {two.info.backend_pid} hold"):
                lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        # The sibling ended and dropped the dead task from the lease row: between tasks, not dead.
        with pytest.raises(lease.LeaseBusy, match="It is between two of its tasks"):
            lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, grace_seconds=120)
        assert holder_of(target) == "run-a"


def test_a_lease_table_from_before_the_advisory_lock_gets_its_columns(target):
    with connect(target) as conn:
        conn.execute(
            "ALTER TABLE migration_audit.writer_lease DROP COLUMN lock_run_id, DROP COLUMN task_pids"
        )
        # An install from before: its audit schema file, hence its recorded version, was older.
        conn.execute("UPDATE migration_audit.audit_schema_version SET sha256 = 'before the advisory lock'")
        ensure_audit_schema(conn)
        ensure_audit_schema(conn)  # and later calls change nothing
        first_task(conn, "run-a")
        assert conn.execute(
            "SELECT run_id, lock_run_id, task_pids FROM migration_audit.writer_lease"
        ).fetchone() == (
            "run-a",
            "run-a",
            [],
        )


def test_a_waiting_run_whose_dag_run_ended_loses_the_lease(target):
    """The approval task failed, or a person marked the waiting run failed: nothing releases its
    lease, so the next run asks Airflow for the holder's state and takes the lease over."""
    states: dict[tuple[str, str], str] = {(DAG, "run-a"): "running"}

    def run_state(dag_id: str, run_id: str) -> str:
        if (dag_id, run_id) not in states:
            raise LookupError("not a run of this deployment")
        return states[(dag_id, run_id)]

    with connect(target) as task, connect(target) as other:
        first_task(task, "run-a")
        lease.wait_for_answer(task, "run-a", 3600)
        with pytest.raises(lease.LeaseBusy):  # still waiting for its answer
            lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, run_state=run_state)
        del states[(DAG, "run-a")]  # unknown (another deployment's run): it keeps waiting
        with pytest.raises(lease.LeaseBusy):
            lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, run_state=run_state)
        states[(DAG, "run-a")] = "failed"
        took = lease.acquire(other, "run-b", DAG, wait_seconds=0, stale_minutes=30, run_state=run_state)
        assert took is not None and took.endswith(
            "its DAG run is failed: it ended while it waited for the cutover's approval"
        )
        assert holder_of(target) == "run-b"


def test_writer_lease_keeps_two_runs_apart(target):
    with (
        psycopg.connect(target, autocommit=True) as first,
        psycopg.connect(target, autocommit=True) as second,
    ):
        from user_migration.db import ensure_audit_schema

        ensure_audit_schema(first)
        lease.acquire(first, "run-a", "user_migration", wait_seconds=1, stale_minutes=30)
        lease.acquire(first, "run-a", "user_migration", wait_seconds=1, stale_minutes=30)  # re-entrant
        started = time.monotonic()
        with pytest.raises(MigrationError, match="being written by run 'run-a' of DAG 'user_migration'"):
            lease.acquire(second, "run-b", "user_migration", wait_seconds=1.5, stale_minutes=30)
        assert 1.4 < time.monotonic() - started < 5
        with pytest.raises(MigrationError, match="does not hold the writer lease"), second.transaction():
            lease.hold(second, "run-b")
        lease.release(first, "run-a")
        lease.acquire(second, "run-b", "user_migration", wait_seconds=1, stale_minutes=30)
        # A live holder (its session holds the lease's advisory lock) is not taken over, however long ago
        # it renewed; see tests/test_lease.py.
        second.execute("UPDATE migration_audit.writer_lease SET renewed_at = now() - interval '2 hours'")
        with pytest.raises(lease.LeaseBusy, match="Its tasks are running now"):
            lease.acquire(first, "run-c", "user_migration", wait_seconds=0, stale_minutes=30)
        # A holder running older code (it takes no advisory lock) is taken over once stale.
        lease.release(second, "run-b")
        second.execute(
            "UPDATE migration_audit.writer_lease SET run_id = 'run-old', lock_run_id = NULL, "
            "renewed_at = now() - interval '2 hours'"
        )
        lease.acquire(first, "run-c", "user_migration", wait_seconds=1, stale_minutes=30)
        assert first.execute("SELECT run_id FROM migration_audit.writer_lease").fetchone()[0] == "run-c"
