"""One writer at a time per target database, across Airflow deployments.

Airflow's max_active_runs=1 keeps one deployment's scheduled and manual runs apart (not its
backfills: Airflow 3 gives a backfill its own max_active_runs, 10 by default); this lease also keeps
apart two deployments, a manual run beside a scheduled one, and the runs of a backfill. The first
task of a run takes the lease (it waits a bounded time, then fails naming the holder's run; a
backfill run is rescheduled instead, see LegacyBackupOperator); every writing transaction holds it with
FOR KEY SHARE, so a takeover waits for in-flight writes to commit; the last task releases it. The
lease of a run that died is taken over once it has not been renewed for ``stale_minutes``.
"""

from __future__ import annotations

import socket
import time

import psycopg

from user_migration.errors import MigrationError


class LeaseBusy(MigrationError):
    """Another live run holds the writer lease; ``holder`` is its run id."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def acquire(
    conn: psycopg.Connection, run_id: str, dag_id: str, wait_seconds: float, stale_minutes: float
) -> None:
    """Take the lease for ``run_id`` (a no-op if it holds it already); raises when the wait runs out."""
    deadline = time.monotonic() + wait_seconds
    conn.execute("INSERT INTO migration_audit.writer_lease (target) VALUES ('target') ON CONFLICT DO NOTHING")
    while True:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{int(remaining * 1000)}ms'")
                holder = conn.execute(
                    "SELECT run_id, dag_id, hostname, acquired_at, renewed_at, "
                    "renewed_at < now() - make_interval(secs => %s) AS stale "
                    "FROM migration_audit.writer_lease WHERE target = 'target' FOR UPDATE",
                    (stale_minutes * 60,),
                ).fetchone()
                if holder[0] is None or holder[0] == run_id or holder[5]:
                    conn.execute(
                        "UPDATE migration_audit.writer_lease SET run_id = %s, dag_id = %s, hostname = %s, "
                        "acquired_at = CASE WHEN run_id = %s THEN acquired_at ELSE now() END, renewed_at = now() "
                        "WHERE target = 'target'",
                        (run_id, dag_id, socket.gethostname(), run_id),
                    )
                    return
        except psycopg.errors.LockNotAvailable:
            holder = conn.execute(
                "SELECT run_id, dag_id, hostname, acquired_at, renewed_at, false "
                "FROM migration_audit.writer_lease WHERE target = 'target'"
            ).fetchone()
        if time.monotonic() >= deadline:
            raise LeaseBusy(
                f"the target database is being written by run '{holder[0]}' of DAG '{holder[1]}' on {holder[2]} "
                f"(since {holder[3]:%Y-%m-%d %H:%M:%S %Z}, last active {holder[4]:%Y-%m-%d %H:%M:%S %Z}); waited "
                f"{wait_seconds:.0f} s. Let that run finish; if it died, its lease is taken over "
                f"{stale_minutes:g} minutes after its last activity",
                holder=holder[0],
            )
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def hold(conn: psycopg.Connection, run_id: str) -> None:
    """Inside a writing transaction: fail unless ``run_id`` holds the lease, and keep it held until commit."""
    row = conn.execute(
        "SELECT run_id FROM migration_audit.writer_lease WHERE target = 'target' FOR KEY SHARE"
    ).fetchone()
    if row is None or row[0] != run_id:
        raise MigrationError(
            f"run '{run_id}' does not hold the writer lease of the target (holder: {row[0] if row else 'nobody'}); "
            "another run took over after this one stopped renewing it. Re-run this DAG run from its first task"
        )


def renew(conn: psycopg.Connection, run_id: str) -> None:
    with conn.transaction():
        hold(conn, run_id)
        conn.execute(
            "UPDATE migration_audit.writer_lease SET renewed_at = now() WHERE target = 'target' AND run_id = %s",
            (run_id,),
        )


def release(conn: psycopg.Connection, run_id: str) -> None:
    with conn.transaction():
        conn.execute(
            "UPDATE migration_audit.writer_lease SET run_id = NULL, renewed_at = now() "
            "WHERE target = 'target' AND run_id = %s",
            (run_id,),
        )
