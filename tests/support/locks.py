"""Running work beside an open application transaction, and waiting until it queues for a lock:
how the deadlock tests line a cutover or a capture install up against the application."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

# Two application transactions across the legacy tables, each as two statements, so that the
# tests can run work between them. A sign-up: the user, then its group link.
SIGNUP = (
    "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, phone_number, "
    "is_active, is_staff) VALUES ('pbkdf2_sha256$1$s$h=', false, 'deadlock@example.com', 'deadlock', "
    "'Dead Lock', '1990-01-01', '9841234567', true, false) RETURNING id",
    "INSERT INTO account_user_groups (user_id, group_id) SELECT %(id)s, min(id) FROM auth_group",
)
# Django's delete: the user's links, then the user, in one transaction.
DELETE = (
    "DELETE FROM account_user_groups WHERE user_id = %(id)s",
    "DELETE FROM account_user WHERE id = %(id)s",
)


def in_background(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``work`` in a thread; its outcome dict gets "result", or "error" for the exception raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as exc:  # reported by the caller's assertions
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until_queued(
    dsn: str, relation: str, mode: str, thread: threading.Thread, outcome: dict, timeout: float = 60
) -> None:
    """Until some session waits for ``mode`` on ``relation`` (the background work has queued)."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + timeout
        while not watcher.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = %s::regclass AND mode = %s)",
            (relation, mode),
        ).fetchone()[0]:
            assert time.monotonic() < deadline and thread.is_alive(), outcome
            time.sleep(0.02)
