"""Fault injection for tests of retries and crashes; inert unless its environment variables are set
(or, for between_commits, a test replaces it).

- ``USER_MIGRATION_FAIL_ONCE=<task_id>[@<run id part>][,...]``: that task raises on its first try
  only (in runs whose id contains ``<run id part>``, when given), so the scheduler's retry must
  complete the run.
- ``USER_MIGRATION_KILL_AT_BATCH=<n>:<marker file>``: the copy process SIGKILLs itself right after
  writing batch ``n`` of a partition (inside the partition's open transaction), once: the marker
  file is created first, and its existence disarms the fault for the retry.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAIL_ONCE_ENV = "USER_MIGRATION_FAIL_ONCE"
KILL_AT_BATCH_ENV = "USER_MIGRATION_KILL_AT_BATCH"


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault injection; never in a normal run."""


def fail_once(task_id: str, try_number: int | None, run_id: str = "") -> None:
    for entry in os.environ.get(FAIL_ONCE_ENV, "").split(","):
        target, _, run_part = entry.strip().partition("@")
        if target == task_id and run_part in run_id and (try_number or 1) <= 1:
            raise InjectedFault(f"injected failure of {task_id} on try {try_number} ({FAIL_ONCE_ENV} is set)")


def kill_after_batch(batch_no: int) -> None:
    spec = os.environ.get(KILL_AT_BATCH_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if int(at) != batch_no or not marker:
        return
    path = Path(marker)
    if path.exists():
        return
    path.write_text(f"killed after batch {batch_no} in pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def between_commits() -> None:
    """A seam where a two-database rollback has committed the legacy side but not yet the target.

    Does nothing; the tests put a fault here (a terminated target session) to prove that a retry
    finishes a half-done rollback.
    """


def batch_read(batch_no: int, rows: list[tuple]) -> None:
    """A seam right after a batch of legacy rows is fetched, inside the batch's measured time.

    Does nothing; the tests slow the legacy server here (a pg_sleep per row) to watch the
    time-boxed batch size adapt.
    """
