"""One writer at a time per target database, across Airflow deployments.

Airflow's max_active_runs=1 keeps one deployment's scheduled and manual runs apart (not its
backfills: Airflow 3 gives a backfill its own max_active_runs, 10 by default); this lease also keeps
apart two deployments, a manual run beside a scheduled one, and the runs of a backfill. The first
task of a run takes the lease (it waits a bounded time, then fails naming the holder's run; a
backfill run is rescheduled instead, see LegacyBackupOperator); every writing transaction holds it with
FOR KEY SHARE, so a takeover waits for in-flight writes to commit; the last task releases it.

A run that died must not lock the next one out, so the holder's liveness is visible in the
database: every task of the holding run, while it executes, holds a session-level advisory lock
(LOCK_KEY, shared, as mapped copy tasks run side by side) on its target connection and lists its
backend pid in the lease row (``active``). The server drops the lock with the session, so a holder
whose tasks hold no lock is dead or between two tasks. It is taken over at once when the row says a
task was executing (it died mid-task), else once it has been idle ``grace_seconds`` (longer than the
scheduler's hand-off plus retry_delay; every task renews the lease as it ends). A holder that never
took the lock (older code) is taken over after ``stale_minutes`` without activity, as before.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg

from user_migration.db import read_sql
from user_migration.errors import MigrationError

log = logging.getLogger(__name__)

# The two-int key of the lease's advisory lock ("umig", "leas"); advisory locks are per database,
# like the lease row. Nothing else may use this key in the target database.
LOCK_KEY = (1970104679, 1818583411)
# A live run's next task starts within the scheduler's hand-off plus retry_delay (20 s) of its last.
DEFAULT_GRACE_SECONDS = 120


class LeaseBusy(MigrationError):
    """Another live run holds the writer lease; ``holder`` is its run id."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """The lease row as acquire() judges it (see include/sql/lease/holder_state.sql)."""

    run_id: str | None
    dag_id: str | None
    hostname: str | None
    acquired_at: datetime | None
    renewed_at: datetime | None
    live_pids: list[int]
    lock_aware: bool
    in_task: bool
    past_grace: bool
    stale: bool
    waiting_until: datetime | None = None
    waiting: bool = False

    def dead(self) -> str | None:
        """Why this holder is presumed dead (so its lease may be taken over), or None while it may live."""
        if self.live_pids:
            return None
        if self.lock_aware and self.in_task:
            return "its task died: the lease's advisory lock is gone with its session"
        if self.lock_aware and self.past_grace:
            return "no task of it has run since the grace after its last task ended"
        if self.stale:
            return "it has not been renewed for lease_stale_minutes"
        return None


def _lock_params() -> dict[str, int]:
    return {"lock_class": LOCK_KEY[0], "lock_obj": LOCK_KEY[1]}


def _holder(conn: psycopg.Connection, grace_seconds: float, stale_minutes: float) -> Holder:
    row = conn.execute(
        read_sql("lease/holder_state.sql"),
        {**_lock_params(), "grace": grace_seconds, "stale": stale_minutes * 60},
    ).fetchone()
    return Holder(*row)


def _holds_lock(conn: psycopg.Connection) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
        "AND granted AND classid = %(lock_class)s::oid AND objid = %(lock_obj)s::oid AND objsubid = 2)",
        _lock_params(),
    ).fetchone()[0]


def _unlock(conn: psycopg.Connection) -> None:
    if _holds_lock(conn):
        conn.execute("SELECT pg_advisory_unlock_shared(%(lock_class)s, %(lock_obj)s)", _lock_params())


def _join(conn: psycopg.Connection, run_id: str) -> bool:
    """In the caller's transaction: this session holds the advisory lock and is listed as a task of
    ``run_id``; the lease is renewed. False (and no lock kept) when ``run_id`` does not hold the lease."""
    if not _holds_lock(conn):
        conn.execute("SELECT pg_try_advisory_lock_shared(%(lock_class)s, %(lock_obj)s)", _lock_params())
    updated = conn.execute(
        read_sql("lease/task_pids.sql"), {**_lock_params(), "run_id": run_id, "joining": True}
    ).rowcount
    if not updated:
        _unlock(conn)
    return bool(updated)


def acquire(
    conn: psycopg.Connection,
    run_id: str,
    dag_id: str,
    wait_seconds: float,
    stale_minutes: float,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    run_state: Callable[[str, str], str | None] | None = None,
) -> str | None:
    """Take the lease for ``run_id`` (a no-op if it holds it already); raises when the wait runs out.

    Returns a sentence naming the run whose lease was taken over and why it was presumed dead, or None.
    The calling session then counts as a task of ``run_id``: call it inside ``active``.
    ``run_state(dag_id, run_id)`` tells a DAG run's state (None: unknown, e.g. another deployment's):
    a holder waiting for an approval whose run has ended (failed, marked failed) is dead.
    """
    deadline = time.monotonic() + wait_seconds
    conn.execute("INSERT INTO migration_audit.writer_lease (target) VALUES ('target') ON CONFLICT DO NOTHING")
    while True:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{int(remaining * 1000)}ms'")
                conn.execute("SELECT FROM migration_audit.writer_lease WHERE target = 'target' FOR UPDATE")
                holder = _holder(conn, grace_seconds, stale_minutes)
                dead = None if holder.run_id in (None, run_id) else holder.dead()
                if dead is None and holder.run_id not in (None, run_id) and holder.waiting:
                    dead = _ended_while_waiting(holder, run_state)
                if holder.run_id in (None, run_id) or dead:
                    conn.execute(
                        "UPDATE migration_audit.writer_lease SET run_id = %(run)s, dag_id = %(dag)s, "
                        "hostname = %(host)s, renewed_at = now(), "
                        "acquired_at = CASE WHEN run_id = %(run)s THEN acquired_at ELSE now() END, "
                        "task_pids = CASE WHEN run_id = %(run)s THEN task_pids ELSE '{}' END, "
                        "waiting_until = NULL "
                        "WHERE target = 'target'",
                        {"run": run_id, "dag": dag_id, "host": socket.gethostname()},
                    )
                    _join(conn, run_id)
                    if dead is None:
                        return None
                    return (
                        f"took over the writer lease of run '{holder.run_id}' of DAG '{holder.dag_id}' on "
                        f"{holder.hostname} (last active {holder.renewed_at:%Y-%m-%d %H:%M:%S %Z}): {dead}"
                    )
        except psycopg.errors.LockNotAvailable:
            holder = _holder(conn, grace_seconds, stale_minutes)
        if time.monotonic() >= deadline:
            raise LeaseBusy(
                _busy_message(holder, wait_seconds, stale_minutes, grace_seconds), holder=holder.run_id
            )
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def _ended_while_waiting(holder: Holder, run_state: Callable[[str, str], str | None] | None) -> str | None:
    """Why a holder waiting for an answer is dead after all: its DAG run has ended; else None."""
    if run_state is None or holder.live_pids or holder.dag_id is None:
        return None
    try:
        state = run_state(holder.dag_id, holder.run_id)
    except Exception:  # another deployment's run, or the API unreachable: keep waiting
        return None
    if state in ("success", "failed"):
        return f"its DAG run is {state}: it ended while it waited for the cutover's approval"
    return None


def _busy_message(holder: Holder, wait_seconds: float, stale_minutes: float, grace_seconds: float) -> str:
    """Who holds the lease, whether it is alive, and what to do about it."""
    if holder.run_id is None:
        return (
            f"another run was taking the writer lease of the target while this one waited {wait_seconds:.0f} s; "
            "try again"
        )
    text = (
        f"the target database is being written by run '{holder.run_id}' of DAG '{holder.dag_id}' on "
        f"{holder.hostname} (since {holder.acquired_at:%Y-%m-%d %H:%M:%S %Z}, last active "
        f"{holder.renewed_at:%Y-%m-%d %H:%M:%S %Z}); waited {wait_seconds:.0f} s. "
    )
    if holder.live_pids:
        sessions = ", ".join(str(pid) for pid in holder.live_pids)
        return text + (
            f"Its tasks are running now (target sessions {sessions} hold the lease's advisory lock). Let that run "
            "finish; if it hangs, stop it (or end those sessions with pg_terminate_backend) and its lease is "
            "taken over at once"
        )
    if holder.waiting_until is not None and holder.waiting_until > holder.renewed_at:
        return text + (
            f"It waits for a person's answer (the cutover's approval) until {holder.waiting_until:%Y-%m-%d %H:%M:%S %Z} "
            "and keeps its lease until then. Answer it (Required actions in the UI), or mark that run failed "
            "(the lease is then taken over)"
        )
    if holder.lock_aware:
        return text + (
            f"It is between two of its tasks. Let that run finish; if it died, its lease is taken over "
            f"{grace_seconds:g} s after its last task ended (lease_grace_seconds)"
        )
    return text + (
        f"Let that run finish; if it died, its lease is taken over {stale_minutes:g} minutes after its last "
        "activity"
    )


@contextmanager
def active(conn: psycopg.Connection, run_id: str, *, holds: bool = True) -> Iterator[None]:
    """Around one task of ``run_id`` on its target connection ``conn``, kept open for the whole task.

    Its session holds the lease's advisory lock meanwhile, so that a run whose process died is told
    from a live one at once; at the end the lease is renewed, so the grace counts from there. With
    ``holds`` the run must hold the lease already (else MigrationError); the first task, which does
    not yet, joins in ``acquire``.
    """
    if holds:
        with conn.transaction():
            hold(conn, run_id)
            _join(conn, run_id)
    try:
        yield
    finally:
        _leave(conn, run_id)


def _leave(conn: psycopg.Connection, run_id: str) -> None:
    """The task ends: renew the lease, drop this session from its tasks, give up the advisory lock."""
    if conn.closed:
        return  # the server ended the session, and with it the lock
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        with conn.transaction():
            conn.execute(
                read_sql("lease/task_pids.sql"), {**_lock_params(), "run_id": run_id, "joining": False}
            )
            _unlock(conn)
    except psycopg.Error:
        log.warning("could not mark the end of this task on the writer lease (connection lost)")


def hold(conn: psycopg.Connection, run_id: str) -> None:
    """Inside a writing transaction: fail unless ``run_id`` holds the lease, and keep it held until commit."""
    row = conn.execute(
        "SELECT run_id FROM migration_audit.writer_lease WHERE target = 'target' FOR KEY SHARE"
    ).fetchone()
    if row is None or row[0] != run_id:
        raise MigrationError(
            f"run '{run_id}' does not hold the writer lease of the target (holder: {row[0] if row else 'nobody'}); "
            "another run took it over, presuming this one dead (a task of it died, or none ran for lease_grace_seconds). "
            "Re-run this DAG run from its first task"
        )


def renew(conn: psycopg.Connection, run_id: str) -> None:
    """Show that ``run_id`` is alive; fails unless it holds the lease."""
    with conn.transaction():
        hold(conn, run_id)
        conn.execute(
            "UPDATE migration_audit.writer_lease SET renewed_at = now() WHERE target = 'target' AND run_id = %s",
            (run_id,),
        )


def wait_for_answer(conn: psycopg.Connection, run_id: str, seconds: float) -> None:
    """``run_id`` runs no task for up to ``seconds`` while a person decides: keep its lease that long.

    Without it, a run waiting for the cutover's approval longer than lease_grace_seconds would be
    presumed dead by a backfill's run (or another deployment's), which ignores max_active_runs.
    The run's next task ends the wait. Fails unless ``run_id`` holds the lease.
    """
    with conn.transaction():
        hold(conn, run_id)
        conn.execute(
            "UPDATE migration_audit.writer_lease SET renewed_at = now(), "
            "waiting_until = now() + make_interval(secs => %s) WHERE target = 'target' AND run_id = %s",
            (seconds, run_id),
        )


def release(conn: psycopg.Connection, run_id: str) -> None:
    """Give the lease up (the run ended); this session stops counting as one of its tasks."""
    with conn.transaction():
        conn.execute(
            "UPDATE migration_audit.writer_lease SET run_id = NULL, renewed_at = now(), task_pids = '{}', "
            "waiting_until = NULL "
            "WHERE target = 'target' AND run_id = %s",
            (run_id,),
        )
        _unlock(conn)
